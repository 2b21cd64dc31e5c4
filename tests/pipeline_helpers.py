"""A worker-rank target for fault tests, importable by spawned ranks: `run_stage` whose DiT raises on
one of its forwards."""
import itertools

from liveavatar.models.transformer import CausalS2VTransformer
from liveavatar.runtime.multi_gpu import run_stage


def stage_failing_at(group, spec, forward: int | None):
    """`run_stage`, except that forward number ``forward`` of this rank raises (None: never)."""
    if forward is not None:
        calls = itertools.count()
        run_block = CausalS2VTransformer.run_block

        def failing(self, *args, **kwargs):
            if next(calls) == forward:
                raise RuntimeError("injected failure")
            return run_block(self, *args, **kwargs)

        CausalS2VTransformer.run_block = failing  # in this rank's own process only
    run_stage(group, spec)
