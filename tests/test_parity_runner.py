import json

import torch
from safetensors.torch import save_file

from liveavatar.testing.parity import Tolerance, compare, find_manifests, main


def test_compare_applies_atol_rtol_and_mean():
    ref = torch.tensor([1.0, -2.0, 0.0])
    assert compare("x", ref + 1e-5, ref, Tolerance(1e-4, 0)).passed
    assert not compare("x", ref + 1e-3, ref, Tolerance(1e-4, 0)).passed
    # rtol scales with |ref|: on -2.0 the bound is 1e-6 + 2e-3.
    assert not compare("x", ref + torch.tensor([0, 2.1e-3, 0]), ref, Tolerance(1e-6, 1e-3)).passed
    assert compare("x", ref + torch.tensor([0, 1.9e-3, 0]), ref, Tolerance(1e-6, 1e-3)).passed
    assert not compare("x", ref + 5e-5, ref, Tolerance(1e-4, 0, max_mean_abs=1e-5)).passed
    assert not compare("x", ref[:2], ref, Tolerance(1, 1)).passed
    assert not compare("x", torch.tensor([float("nan"), -2.0, 0.0]), ref, Tolerance(1, 1)).passed


def test_runner_reports_unknown_kind_and_empty_dir(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    save_file({"t": torch.zeros(1)}, str(tmp_path / "Z_x.safetensors"))
    (tmp_path / "Z_x.json").write_text(json.dumps({"fixture": "Z_x", "tensor_file": "Z_x.safetensors", "tolerances": {}}))
    assert find_manifests(tmp_path) == [tmp_path / "Z_x.json"]
    assert main([str(tmp_path)]) == 1
    assert "unknown fixture kind" in capsys.readouterr().out
