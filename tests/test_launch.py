"""The launchers (launch/): the gcloud commands the TPU launcher prints and runs, its
preemption loop, and the SLURM batch script. Nothing here calls a cloud or a scheduler:
the TPU launcher runs its commands through a runner function, which tests replace with
one that records them and answers with scripted states; the SLURM script runs under bash
with stand-ins for scontrol, srun and python on PATH (SLURM is not installed here)."""

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from launch import slurm, tpu
from launch.tpu_commands import Job, Slice

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'configs/switch_base.py'
WORKDIR = 'gs://bucket/runs/moe'
BASE = ['--name=moe', '--zone=us-east5-a', f'--config={CONFIG}', f'--workdir={WORKDIR}',
        f'--repo={ROOT}']


@pytest.fixture(autouse=True)
def in_repo_root(monkeypatch):
  """The launchers run from the repository root (config paths are relative to it)."""
  monkeypatch.chdir(ROOT)


def dry_run(capsys, *flags):
  """Runs the TPU launcher with --dry-run; returns its commands as argument lists."""
  assert tpu.main([*BASE, '--dry-run', *flags]) == 0
  out = capsys.readouterr().out
  return [shlex.split(line) for line in out.splitlines()]


def remote(cmd):
  """The shell command an `ssh --command=...` runs on the workers."""
  [command] = [a[len('--command='):] for a in cmd if a.startswith('--command=')]
  return command


@pytest.mark.parametrize('accelerator_type,version', [('v5p-64', 'v2-alpha-tpuv5'),
                                                      ('v4-32', 'tpu-ubuntu2204-base')])
@pytest.mark.parametrize('spot', [False, True])
@pytest.mark.parametrize('queued', [False, True])
def test_create_command_per_type(capsys, accelerator_type, version, spot, queued):
  flags = [f'--accelerator-type={accelerator_type}'] + ['--spot'] * spot + ['--queued'] * queued
  create = dry_run(capsys, *flags)[0]
  if queued:
    expected = ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'moe',
                '--zone=us-east5-a', '--node-id=moe', f'--accelerator-type={accelerator_type}',
                f'--runtime-version={version}']
  else:
    expected = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'moe', '--zone=us-east5-a',
                f'--accelerator-type={accelerator_type}', f'--version={version}']
  assert create == expected + ['--spot'] * spot


def test_dry_run_prints_every_step_in_order(capsys):
  cmds = dry_run(capsys, '--accelerator-type=v5p-64', '--spot', '--',
                 '--config.train.steps=1000', '--config.moe.num_experts=64')
  assert all(c[:3] == ['gcloud', 'compute', 'tpus'] for c in cmds)
  steps = [' '.join(c[3:5]) for c in cmds]
  assert steps == ['tpu-vm create', 'tpu-vm scp', 'tpu-vm ssh', 'tpu-vm ssh', 'tpu-vm ssh',
                   'tpu-vm ssh', 'tpu-vm describe', 'tpu-vm delete']
  scp, install, start, follow, status = cmds[1:6]
  assert scp[5:] == ['--recurse', ROOT, 'moe:routed', '--zone=us-east5-a', '--worker=all']
  assert '--worker=all' in install and 'uv pip install' in remote(install)
  assert "-e ~/routed 'jax[tpu]'" in remote(install)
  # Every worker runs the same command; on a TPU VM jax.distributed needs no flags.
  assert '--worker=all' in start
  assert ('~/routed-venv/bin/python -u -m routed.train --config=configs/switch_base.py '
          '--workdir=gs://bucket/runs/moe --config.train.steps=1000 '
          '--config.moe.num_experts=64; echo $? > ~/routed-train.exit') in remote(start)
  assert 'coordinator' not in remote(start).lower()
  assert '--worker=0' in follow and remote(follow).startswith('tail ')
  assert '--worker=0' in status
  assert cmds[6][5:] == ['moe', '--zone=us-east5-a', '--format=value(state)']
  assert cmds[7][5:] == ['moe', '--zone=us-east5-a', '--quiet']


def test_project_goes_on_every_command(capsys):
  cmds = dry_run(capsys, '--accelerator-type=v4-8', '--project=my-proj', '--queued')
  assert all(c.count('--project=my-proj') == 1 for c in cmds)
  assert [' '.join(c[3:5]) for c in cmds[:2]] == ['queued-resources create',
                                                  'queued-resources describe']
  assert cmds[1][-2] == '--format=value(state.state)'
  assert cmds[-1][3:9] == ['queued-resources', 'delete', 'moe', '--zone=us-east5-a',
                           '--force', '--quiet']


@pytest.mark.parametrize('accelerator_type,version', [('v5litepod-16', 'v2-alpha-tpuv5-lite'),
                                                      ('v6e-8', 'v2-alpha-tpuv6e')])
def test_runtime_version_per_type_and_override(capsys, accelerator_type, version):
  assert f'--version={version}' in dry_run(capsys, f'--accelerator-type={accelerator_type}')[0]
  assert '--version=my-image' in dry_run(capsys, f'--accelerator-type={accelerator_type}',
                                         '--runtime-version=my-image')[0]


def test_remote_commands_are_valid_bash(capsys):
  cmds = dry_run(capsys, '--accelerator-type=v5p-8', '--', "--config.data.task=it's")
  scripts = [remote(c) for c in cmds if c[4] == 'ssh']
  assert len(scripts) == 4
  for script in scripts:
    subprocess.run(['bash', '-n', '-c', script], check=True)
  # The override survives two levels of quoting: ssh's shell, then `bash -c`.
  start = [s for s in scripts if 'routed.train' in s][0]
  inner = shlex.split(start)[shlex.split(start).index('-c') + 1]
  assert shlex.split(inner.split(';')[0].split('&&')[1])[-1] == "--config.data.task=it's"


def test_git_repo_is_cloned_on_every_worker(capsys):
  cmds = dry_run(capsys, '--accelerator-type=v4-32', '--repo=https://github.com/o/routed.git',
                 '--git-ref=v1')
  assert cmds[1][3:5] == ['tpu-vm', 'ssh'] and '--worker=all' in cmds[1]
  assert remote(cmds[1]) == ('git clone --quiet https://github.com/o/routed.git ~/routed && '
                             'git -C ~/routed checkout --quiet v1')


def test_delete_never_keeps_the_slice(capsys):
  cmds = dry_run(capsys, '--accelerator-type=v4-32', '--delete=never')
  assert not any('delete' in c for c in cmds)


@pytest.mark.parametrize('argv', [
    ['delete', '--name=moe', '--zone=us-east5-a', '--dry-run'],
    [*BASE, '--accelerator-type=v4-8', '--delete-now', '--dry-run']])
def test_delete_on_request(capsys, argv):
  assert tpu.main(argv) == 0
  assert capsys.readouterr().out.splitlines() == [
      'gcloud compute tpus tpu-vm delete moe --zone=us-east5-a --quiet']


@pytest.mark.parametrize('flags,message', [
    (['--accelerator-type=v5p'], "--accelerator-type: 'v5p' is not TYPE-COUNT"),
    (['--accelerator-type=v3-8'], "--accelerator-type: 'v3-8' is not TYPE-COUNT"),
    (['--accelerator-type=v5p-0'], "--accelerator-type: 'v5p-0'"),
    (['--accelerator-type=V4-32'], "--accelerator-type: 'V4-32'"),
    (['--accelerator-type=v4-32', '--workdir=/tmp/run'], "--workdir: '/tmp/run' is not gs://"),
    (['--accelerator-type=v4-32', '--workdir=runs/x'], "--workdir: 'runs/x' is not gs://"),
    (['--accelerator-type=v4-32', '--workdir=gs://'], "--workdir: 'gs://' is not gs://"),
    (['--accelerator-type=v4-32', '--', '--steps=3'], "after --: '--steps=3' is not"),
    (['--accelerator-type=v4-32', '--config=configs/nope.py'], '--config: no such file'),
    (['--accelerator-type=v4-32', '--queued', '--preemptible'], '--preemptible: not available'),
    (['--accelerator-type=v4-32', '--name=Moe_1'], "--name: 'Moe_1' must be lowercase"),
    (['--zone=z'], 'the following arguments are required: --accelerator-type'),
])
def test_bad_input_is_one_line_and_status_2(capsys, flags, message):
  assert tpu.main([*BASE, '--dry-run', *flags]) == 2
  captured = capsys.readouterr()
  assert captured.out == ''
  assert captured.err.count('\n') == 1 and captured.err.startswith('launch.tpu: ' + message)


# ---- the preemption loop, with a runner that answers as the cloud would ----------------

class ScriptedCloud:
  """A runner (see launch.tpu.Runner) that records each command and answers it from a
  script: {kind: [Result, ...]} consumed in order, success with no output after that."""

  def __init__(self, **answers):
    self.answers = {kind: list(results) for kind, results in answers.items()}
    self.kinds, self.commands = [], []

  @staticmethod
  def kind(cmd):
    if cmd[4] != 'ssh':
      return f'{cmd[3]} {cmd[4]}'.replace('tpu-vm ', '').replace('queued-resources ', 'qr-')
    script = remote(cmd)
    for word, kind in (('uv pip', 'install'), ('routed.train', 'start'), ('tail', 'follow'),
                       ('kill -0', 'status'), ('git clone', 'clone')):
      if word in script:
        return kind
    raise AssertionError(script)

  def __call__(self, cmd, capture=False, dry_answer=''):
    kind = self.kind(cmd)
    self.kinds.append(kind)
    self.commands.append(cmd)
    queue = self.answers.get(kind, [])
    return queue.pop(0) if queue else tpu.Result(0, '')


def ok(output=''):
  return tpu.Result(0, output)


SLICE = Slice('moe', 'us-east5-a', None, 'v5p-64', 'v2-alpha-tpuv5', spot=True)
JOB = Job(CONFIG, WORKDIR, ('--config.train.steps=1000',), ROOT)
LIFE = ['create', 'scp', 'install', 'start', 'follow', 'status', 'describe']


def run_launch(cloud, slice_=SLICE, **options):
  return tpu.launch(slice_, JOB, cloud, sleep=lambda seconds: None, **options)


def test_preempted_slice_is_recreated_and_the_same_command_rerun():
  # Life 1: the slice is preempted (the trainer saved on SIGTERM and exited 0).
  # Life 2: the rerun resumes from the checkpoint and finishes.
  cloud = ScriptedCloud(status=[ok('0'), ok('0')], describe=[ok('PREEMPTED'), ok('READY')])
  assert run_launch(cloud, restart_preempted=True) == 0
  assert cloud.kinds == LIFE + ['delete'] + LIFE + ['delete']
  starts = [c for c, k in zip(cloud.commands, cloud.kinds) if k == 'start']
  assert starts[0] == starts[1]
  creates = [c for c, k in zip(cloud.commands, cloud.kinds) if k == 'create']
  assert creates[0] == creates[1] and '--spot' in creates[0]


def test_restarts_are_bounded():
  cloud = ScriptedCloud(describe=[ok('PREEMPTED')] * 10, status=[ok('0')] * 10)
  assert run_launch(cloud, restart_preempted=True, max_restarts=2) == 1
  assert cloud.kinds.count('create') == 3
  assert cloud.kinds == (LIFE + ['delete']) * 3  # the last delete: on finish


def test_without_restart_a_preempted_run_stops_and_is_deleted():
  cloud = ScriptedCloud(status=[ok('0')], describe=[ok('PREEMPTED')])
  assert run_launch(cloud) == 1
  assert cloud.kinds == LIFE + ['delete']


def test_preemption_during_setup_restarts_too():
  cloud = ScriptedCloud(install=[tpu.Result(255, '')], describe=[ok('PREEMPTED'), ok('READY')],
                        status=[ok('0')])
  assert run_launch(cloud, restart_preempted=True) == 0
  assert cloud.kinds == ['create', 'scp', 'install', 'describe', 'delete'] + LIFE + ['delete']


def test_trainer_failure_is_the_exit_status_and_the_slice_is_deleted():
  cloud = ScriptedCloud(status=[ok('3')], describe=[ok('READY')])
  assert run_launch(cloud, restart_preempted=True) == 3
  assert cloud.kinds == LIFE + ['delete']


def test_lost_connection_follows_again():
  cloud = ScriptedCloud(follow=[tpu.Result(255, '')], status=[ok('running'), ok('0')],
                        describe=[ok('READY'), ok('READY')])
  assert run_launch(cloud, delete_on_finish=False) == 0
  assert cloud.kinds == LIFE + ['follow', 'status', 'describe']


def test_failed_create_deletes_nothing():
  cloud = ScriptedCloud(create=[tpu.Result(1, '')])
  assert run_launch(cloud, restart_preempted=True) == 1
  assert cloud.kinds == ['create']


def test_queued_resource_is_polled_until_active():
  queued = Slice('moe', 'us-east5-a', None, 'v4-32', 'tpu-ubuntu2204-base', queued=True)
  cloud = ScriptedCloud(**{'qr-describe': [ok('WAITING_FOR_RESOURCES'), ok('PROVISIONING'),
                                           ok('ACTIVE')]}, status=[ok('0')])
  assert run_launch(cloud, queued) == 0
  assert cloud.kinds == ['qr-create'] + ['qr-describe'] * 3 + LIFE[1:] + ['qr-delete']


# ---- SLURM -------------------------------------------------------------------------------

SLURM_ARGS = ['--nodes=4', '--gpus-per-node=8', f'--config={CONFIG}',
              '--workdir=/shared/runs/x', '--partition=gpu', '--time=2-00:00:00']


def generate(capsys, *flags):
  assert slurm.main([*SLURM_ARGS, *flags]) == 0
  return capsys.readouterr().out


def test_slurm_script_has_the_sbatch_lines_and_distributed_variables(capsys):
  text = generate(capsys, '--', '--config.train.steps=10')
  sbatch = [line for line in text.splitlines() if line.startswith('#SBATCH')]
  assert sbatch == ['#SBATCH --job-name=routed', '#SBATCH --nodes=4',
                    '#SBATCH --ntasks-per-node=1', '#SBATCH --gpus-per-node=8',
                    '#SBATCH --time=2-00:00:00', '#SBATCH --partition=gpu',
                    '#SBATCH --output=%x-%j.log', '#SBATCH --signal=TERM@120']
  assert ('COORDINATOR_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)'
          in text.splitlines())
  assert 'export ROUTED_COORDINATOR="$COORDINATOR_HOST:8476"' in text.splitlines()
  assert 'export ROUTED_NUM_PROCESSES="$SLURM_NTASKS"' in text.splitlines()
  assert 'ROUTED_PROCESS_ID="$SLURM_PROCID"' in text
  assert ('TRAIN=(python -u -m routed.train --config=configs/switch_base.py '
          '--workdir=/shared/runs/x --config.train.steps=10)') in text.splitlines()
  subprocess.run(['bash', '-n'], input=text, text=True, check=True)


def test_slurm_requeue_script(capsys):
  text = generate(capsys, '--requeue', '--venv=/shared/venv', '--cpus-per-task=32')
  for line in ('#SBATCH --requeue', '#SBATCH --signal=B:TERM@120', '#SBATCH --open-mode=append',
               '#SBATCH --cpus-per-task=32', 'source /shared/venv/bin/activate',
               '  scontrol requeue "$SLURM_JOB_ID" || true'):
    assert line in text.splitlines()
  subprocess.run(['bash', '-n'], input=text, text=True, check=True)


def fake_cluster(tmp_path, srun_body):
  """bin/ with stand-ins for scontrol, srun (running srun_body) and python, which log
  their calls to calls.txt; SLURM's variables for a two-node job."""
  bin_dir, calls = tmp_path / 'bin', tmp_path / 'calls.txt'
  bin_dir.mkdir()
  stubs = {
      'scontrol': f'echo "scontrol $*" >> {calls}\n'
                  '[ "$1 $2" = "show hostnames" ] && printf "gpu-a17\\ngpu-a18\\n"; exit 0',
      'srun': f'echo "srun $*" >> {calls}\n' + srun_body,
      'python': f'echo "python $* | $ROUTED_COORDINATOR $ROUTED_NUM_PROCESSES '
                f'$ROUTED_PROCESS_ID" >> {calls}',
  }
  for name, body in stubs.items():
    (bin_dir / name).write_text('#!/bin/bash\n' + body + '\n')
    (bin_dir / name).chmod(0o755)
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', SLURM_JOB_ID='77',
             SLURM_JOB_NODELIST='gpu-a[17-18]', SLURM_NTASKS='2')
  return env, calls


def test_slurm_script_runs_one_trainer_per_task_with_its_process_id(capsys, tmp_path):
  script = tmp_path / 'job.sbatch'
  script.write_text(generate(capsys, '--', '--config.train.steps=10'))
  # srun starts its command once per task with that task's SLURM_PROCID.
  env, calls = fake_cluster(tmp_path, 'shift; for i in 0 1; do SLURM_PROCID=$i "$@"; done')
  subprocess.run(['bash', str(script)], env=env, check=True, timeout=60)
  train = ('python -u -m routed.train --config=configs/switch_base.py '
           '--workdir=/shared/runs/x --config.train.steps=10')
  assert calls.read_text().splitlines()[-2:] == [f'{train} | gpu-a17:8476 2 0',
                                                 f'{train} | gpu-a17:8476 2 1']


def test_slurm_requeue_forwards_sigterm_then_requeues(capsys, tmp_path):
  script = tmp_path / 'job.sbatch'
  script.write_text(generate(capsys, '--requeue'))
  # The stand-in srun runs until SIGTERM, then (like the trainers) takes a moment to
  # save and exits 0; the script must wait for that before it requeues.
  env, calls = fake_cluster(
      tmp_path, f'trap \'echo "srun got TERM" >> {tmp_path}/calls.txt; kill $!; sleep 0.5; '
                f'echo "srun saved" >> {tmp_path}/calls.txt; exit 0\' TERM\n'
                f'echo "srun ready" >> {tmp_path}/calls.txt\n'
                'sleep 60 & wait')
  proc = subprocess.Popen(['bash', str(script)], env=env)
  try:
    deadline = time.monotonic() + 30
    while 'srun ready' not in (calls.read_text() if calls.exists() else ''):
      assert time.monotonic() < deadline and proc.poll() is None
      time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # what `#SBATCH --signal=B:TERM@120` sends
    assert proc.wait(timeout=30) == 0
  finally:
    proc.kill()
  assert calls.read_text().splitlines()[-3:] == ['srun got TERM', 'srun saved',
                                                 'scontrol requeue 77']


@pytest.mark.parametrize('flags,message', [
    (['--nodes=0'], '--nodes: must be at least 1, got 0'),
    (['--gpus-per-node=-1'], '--gpus-per-node: must be at least 1'),
    (['--workdir=runs/x'], "--workdir: 'runs/x' is relative"),
    (['--time=tomorrow'], "--time: 'tomorrow' is not a SLURM time"),
    (['--config=configs/nope.py'], '--config: no such file configs/nope.py'),
    (['--', 'train.steps=3'], "after --: 'train.steps=3' is not --config.KEY=VALUE"),
    (['--port=70000'], '--port: 70000 is not a TCP port'),
])
def test_slurm_bad_input_is_one_line_and_status_2(capsys, flags, message):
  assert slurm.main([*SLURM_ARGS, *flags]) == 2
  captured = capsys.readouterr()
  assert captured.out == ''
  assert captured.err.count('\n') == 1 and captured.err.startswith('launch.slurm: ' + message)


def test_slurm_output_flag_writes_the_file(capsys, tmp_path):
  out = tmp_path / 'job.sbatch'
  assert slurm.main([*SLURM_ARGS, f'--output={out}']) == 0
  assert capsys.readouterr().out == ''
  assert out.read_text().startswith('#!/bin/bash\n')


def test_example_sbatch_is_the_generators_output():
  """launch/example_slurm.sbatch must stay what its `Generated by` line produces."""
  with open(os.path.join(ROOT, 'launch', 'example_slurm.sbatch')) as f:
    text = f.read()
  argv = shlex.split(text.splitlines()[1].removeprefix('# Generated by: '))
  assert argv[:3] == ['python', '-m', 'launch.slurm']
  proc = subprocess.run([sys.executable, '-m', 'launch.slurm', *argv[3:]], cwd=ROOT,
                        capture_output=True, text=True, check=True)
  assert proc.stdout == text
