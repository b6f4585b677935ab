"""Two "nodes" on one machine: two `torchrun --nnodes 2` launches that meet through a c10d
rendezvous on a loopback port train the same parameters as one launch of 2 processes on one node
(gloo on CPU), one of them started by scripts/slurm/pretrain.sbatch (srun and scontrol stood in
for by two lines of shell each); a node alone gives up on the rendezvous with an error."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from tests.pretrain_helpers import final_weights, max_difference, write_recipe
from tests.test_distributed import TORCHRUN, args, env, torchrun

SBATCH = Path(__file__).parents[1] / "scripts" / "slurm" / "pretrain.sbatch"
RDZV_ID = "multinode-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node(port: int, log_dir) -> list[str]:
    # The multi-node form: no --standalone; every node names the same rendezvous endpoint and
    # id, and c10d hands out the ranks (the host whose address matches the endpoint serves it).
    return [TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", RDZV_ID,
            "--max-restarts", "0", "--log-dir", str(log_dir)]


def run_nodes(commands: list[list[str]], environments: list[dict]) -> None:
    """Start every node at once (the rendezvous waits for all), wait for all of them."""
    nodes = [subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for cmd, e in zip(commands, environments)]
    outputs = []
    try:
        for proc in nodes:
            outputs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in nodes:
            if proc.poll() is None:
                proc.kill()
    assert [p.returncode for p in nodes] == [0] * len(nodes), "\n".join(
        o[-3000:] for o in outputs)


def slurm_node(recipe: Path, data: Path, out: Path, port: int, stubs: Path) -> dict[str, str]:
    """The environment scripts/slurm/pretrain.sbatch sees on one node of a 2-node job whose
    first node is this machine; `stubs` stands in for Slurm's srun (run the task here) and
    scontrol (the first node's address)."""
    stubs.mkdir(exist_ok=True)
    (stubs / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                                'exec "$@"\n')
    (stubs / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    return {**env(), "PATH": f"{stubs}:{Path(TORCHRUN).parent}:{os.environ['PATH']}",
            "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "1", "SLURM_JOB_ID": RDZV_ID,
            "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_CPUS_PER_TASK": "1",
            "RECIPE": str(recipe), "DATA": str(data), "OUT": str(out), "PARALLEL": "ddp",
            "MICRO_BATCH": "2", "PRECISION": "fp32",
            "RECOMPUTE": "--no-checkpoint-activations", "RDZV_PORT": str(port)}


def test_two_nodes_of_one_process_equal_one_node_of_two(pd98_encoded, tmp_path):
    # One node runs the torchrun line of docs/scale.md, the other the Slurm script (as each
    # node of a Slurm job does): both must reach the same rendezvous and train as one job.
    recipe = write_recipe(tmp_path, steps=4, checkpoint_every=0, eval_every=0)
    one = subprocess.run([*torchrun(2, tmp_path / "logs-one"),
                          *args(recipe, pd98_encoded, tmp_path / "one")],
                         env=env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr + one.stdout
    port, out = free_port(), tmp_path / "two"  # one run directory: a cluster's shared disk
    run_nodes([[*node(port, tmp_path / "logs-node"), *args(recipe, pd98_encoded, out)],
               ["bash", str(SBATCH)]],
              [env(), slurm_node(recipe, pd98_encoded, out, port, tmp_path / "bin")])
    assert max_difference(final_weights(tmp_path / "one"), final_weights(out)) < 1e-5


def test_a_node_that_never_joins_ends_the_rendezvous_with_an_error(tmp_path):
    # One of two nodes alone: torchrun gives up after --rdzv-conf join_timeout instead of waiting
    # for ever (a Slurm node that failed to start must not hold the job's allocation).
    proc = subprocess.run([*node(free_port(), tmp_path / "logs"), "--rdzv-conf",
                           "join_timeout=5", "-m", "motian.cli", "--help"],
                          env=env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "RendezvousTimeoutError" in proc.stderr + proc.stdout, proc.stderr[-2000:]

