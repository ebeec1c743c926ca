"""Two "nodes" on one machine: the fit over torchrun on loopback, and the SLURM script on a local cluster.

Both run the multi-process fit of tests/fit_probes.py with ``trainer.num_nodes: 2`` and one
process per node, and their losses must agree with the same fit in one process.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fit_probes import LOSS_TOLERANCE, ROOT, STEPS, TIMEOUT, env, fit_config, free_port, mean_losses, rows

multiprocess = pytest.mark.multiprocess


def assert_two_nodes_agree_with_one_process(run: Path, single: Path, strategy: str) -> None:
    for rank in (0, 1):
        assert {(r["world_size"], r["num_nodes"]) for r in rows(run, "losses", rank)} == {(2, 2)}
        (probe,) = rows(run, "reference", rank)
        assert probe["strategy"] == strategy and probe["ref_vs_base"] < 1e-5, probe
        assert [r["step"] for r in rows(run, "revisions", rank)] == [0, 2]  # the conscience ran and revised
    two, one = mean_losses(run, 2), mean_losses(single, 1)
    assert len(two) == len(one) == STEPS
    assert max(abs(a - b) for a, b in zip(two, one)) < LOSS_TOLERANCE, (two, one)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == STEPS


@multiprocess
def test_two_node_torchrun_fsdp_fit_matches_single_process(two_node_fsdp_run, single_process_run):
    assert_two_nodes_agree_with_one_process(two_node_fsdp_run, single_process_run, "FSDP2")


SLURM_CONF = """\
ClusterName=emalign-test
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool-%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={port1} CPUs=1 RealMemory=1000
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={port2} CPUs=1 RealMemory=1000
PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


@pytest.fixture
def slurm_cluster(tmp_path):
    """slurmctld and two slurmd ("nodes" n1, n2) on this machine; yields the environment for sbatch."""
    missing = [b for b in ("munged", "munge", "slurmctld", "slurmd", "sbatch", "sinfo") if shutil.which(b) is None]
    if missing or os.geteuid() != 0:
        pytest.skip("needs root and Debian's slurm-wlm (apt-get install slurmd slurmctld slurm-client munge); "
                    f"missing: {missing}")
    directory = tmp_path / "slurm"
    (directory / "state").mkdir(parents=True)
    conf = directory / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=socket.gethostname().split(".")[0], dir=directory, ctld_port=free_port(),
                                      port1=free_port(), port2=free_port()))
    cluster_env = dict(env(), SLURM_CONF=str(conf))
    started_munge = subprocess.run(["munge", "-n"], capture_output=True).returncode != 0
    if started_munge:
        Path("/run/munge").mkdir(exist_ok=True)
        subprocess.run(["munged", "--force", "--pid-file", str(directory / "munged.pid")], check=True)
    subprocess.run(["slurmctld", "-f", str(conf)], env=cluster_env, check=True)
    for node in ("n1", "n2"):
        subprocess.run(["slurmd", "-f", str(conf), "-N", node], env=cluster_env, check=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=cluster_env, capture_output=True,
                                    text=True).stdout.split()
            if states == ["idle", "idle"]:
                break
            time.sleep(1)
        else:
            pytest.fail(f"the local SLURM cluster did not come up: {states}")
        yield cluster_env
    finally:
        pids = [directory / "slurmd-n1.pid", directory / "slurmd-n2.pid", directory / "slurmctld.pid"]
        for pidfile in pids + ([directory / "munged.pid"] if started_munge else []):
            if pidfile.is_file():
                os.kill(int(pidfile.read_text()), 15)


@multiprocess
def test_sbatch_example_runs_a_two_node_fit_on_a_local_slurm_cluster(slurm_cluster, tiny_model_dir, single_process_run,
                                                                      tmp_path):
    run = tmp_path / "slurm-run"
    config = fit_config(tiny_model_dir, run, processes=2)
    job = ["sbatch", "--wait", "--nodes", "2", "--ntasks-per-node", "1", "--chdir", str(ROOT),
           "--output", str(tmp_path / "job.out"), f"--export=ALL,MASTER_ADDR=127.0.0.1,PYTHON={sys.executable}"]
    script = [str(ROOT / "configs" / "slurm" / "fit.sbatch"), "--config", str(config), "--trainer.strategy", "ddp"]
    done = subprocess.run(job + script, env=slurm_cluster, capture_output=True, text=True, timeout=TIMEOUT)
    out = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").is_file() else ""
    assert done.returncode == 0, done.stderr + out[-3000:]
    assert_two_nodes_agree_with_one_process(run, single_process_run, "DDPStrategy")
