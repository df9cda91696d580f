"""tools/slurm_train.sh, the multi-node SLURM recipe: run with SLURM's environment and stand-ins
for srun and scontrol (no cluster here); the command each node would run is what train_net's own
parser accepts."""
import os
import shlex
import stat
import subprocess

import pytest

from distill_utils import CONFIGS, PROJECT, ROOT

SCRIPT = os.path.join(PROJECT, "tools", "slurm_train.sh")
CONFIG = os.path.relpath(os.path.join(CONFIGS, "Distillation-FasterRCNN-R18-R50-dsig-1x.yaml"),
                         ROOT)


def _stand_in(folder, name, body):
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _run(tmp_path, env, *args):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _stand_in(bin_dir, "srun", 'echo "srun task=$DSIG_SLURM_TASK $*"')
    _stand_in(bin_dir, "scontrol", 'echo gpu07; echo gpu08')
    full = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=ROOT)
    full = {k: v for k, v in full.items() if not k.startswith("SLURM_") or k == "SLURM_SUBMIT_DIR"}
    full.update(env)
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=full,
                          cwd=tmp_path)


def test_outside_a_job_and_without_a_config(tmp_path):
    r = _run(tmp_path, {}, CONFIG)
    assert r.returncode == 2 and "submit it with sbatch" in r.stderr
    r = _run(tmp_path, {}, )
    assert r.returncode == 2 and "Multi-node training with SLURM" in r.stdout
    r = _run(tmp_path, {"SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_ID": "1"}, CONFIG)
    assert r.returncode == 2 and "not the dsig repository" in r.stderr


def test_batch_step_starts_one_task_per_node(tmp_path):
    r = _run(tmp_path, {"SLURM_JOB_ID": "4242"}, CONFIG, "SOLVER.REFERENCE_WORLD_SIZE", "4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["srun", "task=1", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                                "bash", SCRIPT, CONFIG, "SOLVER.REFERENCE_WORLD_SIZE", "4"]


def test_each_node_runs_train_net_with_its_rank(tmp_path):
    pytest.importorskip("detectron2")
    env = {"SLURM_JOB_ID": "4242", "DSIG_SLURM_TASK": "1", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_GPUS_ON_NODE": "8",
           "DSIG_DRY_RUN": "1"}
    r = _run(tmp_path, env, CONFIG, "SOLVER.REFERENCE_WORLD_SIZE", "4")
    assert r.returncode == 0, r.stderr
    banner, command = r.stdout.strip().splitlines()
    assert "node 1 of 2" in banner and "rendezvous gpu07:24242" in banner
    argv = shlex.split(command)
    assert argv[1] == "projects/Distillation/train_net.py"
    import train_net  # the project's script: its parser must take every option given

    args = train_net.parser().parse_args(argv[2:])
    assert (args.num_gpus, args.num_machines, args.machine_rank) == (8, 2, 1)
    assert args.dist_url == "tcp://gpu07:24242" and args.resume
    assert args.config_file == CONFIG
    # the user's options come last, so they override the script's OUTPUT_DIR
    assert args.opts == ["OUTPUT_DIR", "./output/slurm.Distillation-FasterRCNN-R18-R50-dsig-1x",
                         "SOLVER.REFERENCE_WORLD_SIZE", "4"]
    r = _run(tmp_path, env, CONFIG, "OUTPUT_DIR")
    assert r.returncode == 2 and "odd count" in r.stderr
