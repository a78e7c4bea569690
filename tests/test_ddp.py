"""Pruning with Lightning's DDP on the CPU (2 processes, gloo) gives what one process gives."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from .conftest import REPO, saved_weights


def fit_command(model_dir, text, root) -> list[str]:
    """`besa-pl fit` of the tiny model on 8 x 32 tokens, as a fresh process runs it."""
    return [sys.executable, "-m", "besa_pl.cli", "fit", "--model.pretrained", str(model_dir)] + [
        "--data.dataset",
        str(text),
        "--data.nsamples",
        "8",
        "--data.seqlen",
        "32",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger",
        "false",
    ]


# One thread in every process: a CPU matmul's last bits may depend on the thread count.
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def fit(model_dir, text, root, *extra, ranks=1, expect_failure=False):
    """`besa-pl fit` in a fresh process (Lightning's DDP launcher starts the other rank from it)."""
    args = fit_command(model_dir, text, root)
    if ranks > 1:
        args += ["--trainer.devices", str(ranks), "--trainer.strategy", "ddp"]
    done = subprocess.run(args + list(extra), capture_output=True, text=True, cwd=str(REPO), env=ENV, timeout=600)
    if expect_failure:
        assert done.returncode != 0
    else:
        assert done.returncode == 0, done.stderr[:2000] + "\n...\n" + done.stderr[-2000:]  # both ranks' ends
    return done


def fit_two_nodes(model_dir, text, root, *extra):
    """Two "nodes" on this machine, as a cluster launcher would start them: one process each, with
    NODE_RANK 0 and 1 and the master's address; Lightning's own environment does the rest."""
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nodes = ["--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "ddp"]
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    processes = [
        subprocess.Popen(
            fit_command(model_dir, text, root) + nodes + list(extra),
            env={**env, "NODE_RANK": str(node)},
            cwd=str(REPO),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]


def masks(root):
    return {name: w != 0 for name, w in saved_weights(root / "pruned").items() if name.endswith("proj.weight")}


def differing_share(a, b):
    return sum(int((a[n] != b[n]).sum()) for n in a) / sum(t.numel() for t in a.values())


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_one_shot_methods_on_two_ranks_match_one_process(method, tiny_model_dir, calibration_text, tmp_path):
    fit(tiny_model_dir("llama"), calibration_text, tmp_path / "one", "--model.method", method)
    fit(tiny_model_dir("llama"), calibration_text, tmp_path / "two", "--model.method", method, ranks=2)
    # The statistics are summed exactly (float64) over samples and ranks: the very same masks.
    assert differing_share(masks(tmp_path / "one"), masks(tmp_path / "two")) == 0


def test_besa_on_two_ranks_matches_one_process_with_twice_the_micro_batch(tiny_model_dir, calibration_text, tmp_path):
    # Per-sample gradients, channel norms and Grams are summed exactly (float64) over samples and
    # ranks, so the default method, reconstruction and swaps included, chooses the very same masks.
    fit(tiny_model_dir("llama"), calibration_text, tmp_path / "one", "--data.batch_size", "2")
    fit(tiny_model_dir("llama"), calibration_text, tmp_path / "two", ranks=2)
    assert differing_share(masks(tmp_path / "one"), masks(tmp_path / "two")) == 0
    one, two = saved_weights(tmp_path / "one" / "pruned"), saved_weights(tmp_path / "two" / "pruned")
    assert all(torch.equal(one[name], two[name]) for name in one)  # and the same weights, bit for bit
    for run in ("one", "two"):
        assert json.loads((tmp_path / run / "sparsity.json").read_text())["overall"] == pytest.approx(0.5, abs=1e-9)
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["method"] == "besa"  # written once, by rank 0


def test_resume_under_two_ranks_and_a_changed_rank_count_is_refused(tiny_model_dir, calibration_text, tmp_path):
    fit(tiny_model_dir("llama"), calibration_text, tmp_path / "straight", ranks=2)
    interrupt = tmp_path / "interrupt.yaml"
    interrupt.write_text(
        "trainer:\n  callbacks:\n    - class_path: tests.test_resume.InterruptAt\n"
        "      init_args: {block: 1, batch: 2}\n"
    )
    root = tmp_path / "resumed"
    fit(tiny_model_dir("llama"), calibration_text, root, "--config", str(interrupt), ranks=2, expect_failure=True)
    assert torch.load(root / "checkpoints" / "last-interrupted.ckpt", weights_only=False)["besa"]["block_index"] == 1
    refused = fit(tiny_model_dir("llama"), calibration_text, root, "--ckpt_path", "last", expect_failure=True)
    assert "trainer.world_size=2 in the checkpoint but 1 now" in " ".join(refused.stderr.split())
    fit(tiny_model_dir("llama"), calibration_text, root, "--ckpt_path", "last", ranks=2)
    expected, resumed = saved_weights(tmp_path / "straight" / "pruned"), saved_weights(root / "pruned")
    assert all(torch.equal(resumed[name], tensor) for name, tensor in expected.items())


def test_an_error_on_the_ranks_ends_every_rank_with_one_line(tiny_model_dir, calibration_text, tmp_path):
    done = fit(
        tiny_model_dir("llama"), calibration_text, tmp_path, "--data.nsamples", "7", ranks=2, expect_failure=True
    )  # the subprocess timeout would fail the test on a hang
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert lines and all("data.nsamples=7 does not split over 2 ranks; use a multiple of 2" in line for line in lines)
    assert "Traceback" not in done.stderr and not (tmp_path / "pruned").exists()


def test_two_nodes_on_one_machine_match_one_process(tiny_model_dir, calibration_text, tmp_path):
    fit(tiny_model_dir("llama"), calibration_text, tmp_path / "one", "--data.batch_size", "2")
    fit_two_nodes(tiny_model_dir("llama"), calibration_text, tmp_path / "nodes")
    one, nodes = saved_weights(tmp_path / "one" / "pruned"), saved_weights(tmp_path / "nodes" / "pruned")
    assert differing_share(masks(tmp_path / "one"), masks(tmp_path / "nodes")) == 0
    assert all(torch.equal(one[name], nodes[name]) for name in one)
    results = json.loads((tmp_path / "nodes" / "results.json").read_text())
    assert results["method"] == "besa"  # written once, by global rank 0
