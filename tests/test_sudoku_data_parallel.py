"""train.py's data parallelism (`--workers`, examples/sudoku/data_parallel.py): averaged
gradients equal the whole batch's, the workers' weights stay equal, and a run trains."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.sudoku_examples import SUDOKU, load

WORLD = 2


def _gradient_worker(rank: int, port: int, out: Path) -> None:
    """Rank r's loss is the mean over its half of a batch; `only_rank0` is reached by rank 0 alone."""
    data_parallel = load("data_parallel")
    data_parallel.join(rank, WORLD, port)
    torch.manual_seed(0)
    layer, only_rank0 = torch.nn.Linear(3, 2), torch.nn.Parameter(torch.ones(2))
    inputs = torch.randn(2 * WORLD, 3)
    loss = layer(inputs[rank * 2:(rank + 1) * 2]).square().mean()
    if rank == 0:
        loss = loss + (only_rank0 * 3).sum()
    loss.backward()
    data_parallel.average_gradients([layer.weight, layer.bias, only_rank0])
    data_parallel.check_in_sync([layer.weight])  # equal weights pass
    with torch.no_grad():
        layer.bias += rank  # rank 1's weights drift
    try:
        data_parallel.check_in_sync([layer.weight, layer.bias])
        drift_caught = False
    except RuntimeError:
        drift_caught = True
    torch.save({"weight": layer.weight.grad, "bias": layer.bias.grad, "only_rank0": only_rank0.grad,
                "drift_caught": drift_caught, "largest": data_parallel.largest(float(rank)),
                "mean": data_parallel.mean(float(rank))}, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_averaged_gradients_are_the_whole_batchs(tmp_path):
    """Catches workers that step on their own half-batch gradient (or sum instead of average),
    a parameter one worker did not reach that breaks the exchange, and drift going unnoticed."""
    data_parallel = load("data_parallel")
    torch.multiprocessing.spawn(_gradient_worker, args=(data_parallel.free_port(), tmp_path), nprocs=WORLD)
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    layer(torch.randn(2 * WORLD, 3)).square().mean().backward()
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["weight"], layer.weight.grad)
        torch.testing.assert_close(result["bias"], layer.bias.grad)
        torch.testing.assert_close(result["only_rank0"], torch.full((2,), 3.0 / WORLD))
        assert result["drift_caught"] and result["largest"] == WORLD - 1 and result["mean"] == 0.5


def test_two_workers_train_and_write_a_checkpoint(tmp_path):
    """Catches a `--workers` run that hangs, loses its lead's log or checkpoint, or whose
    workers drift apart (the run checks their weights at every save and would fail)."""
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, str(SUDOKU / "train.py"), "--run-dir", str(tmp_path / "run"), "--out", str(out),
         "--init-from", str(SUDOKU / "checkpoint"), "--layers", "6", "--steps", "2", "--batch", "4", "--givens", "50-50",
         "--pool", "2", "--eval-every", "0", "--threads", "1", "--workers", str(WORLD)],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["loss"] > 0 for r in log)
    from safetensors.torch import load_file

    shipped, written = load_file(str(SUDOKU / "checkpoint" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(shipped[name], written[name]) for name in shipped)


def test_a_batch_that_does_not_split_over_the_workers_is_refused():
    train = load("train")
    with pytest.raises(SystemExit):
        train.parse_args(["--run-dir", "x", "--batch", "5", "--workers", "2"])
