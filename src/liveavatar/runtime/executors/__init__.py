"""Executors run the DiT forwards for the sampling loop behind submit/collect; the loop never knows which
one it has."""
from liveavatar.runtime.executors.base import BlockExecutor, BlockJob, ExecutorFactory, ForwardHook
from liveavatar.runtime.executors.graphs import ForwardGraphs, graphs_allowed
from liveavatar.runtime.executors.sequential import SequentialExecutor, SequentialFactory

__all__ = ["BlockExecutor", "BlockJob", "ExecutorFactory", "ForwardGraphs", "ForwardHook", "SequentialExecutor",
           "SequentialFactory", "graphs_allowed"]
