"""Several runs at once on one store, through the real launcher: nothing clobbered, identical
work done once."""
import threading

import pytest

from flows.launch import build_command, run_stage
from stages.artifacts import ArtifactStore
from tests.conftest import REPO

TINY = REPO / "configs" / "tiny" / "pretrain.yaml"
ONE_RANK = ["deepspeed.num_gpus=1", "deepspeed.template=infra/deepspeed/zero0.json",
            "train.global_batch_size=4"]


def launch_together(commands: list[list[str]], home) -> list[tuple[int, str | None, str]]:
    results: list = [None] * len(commands)

    def one(i: int) -> None:
        lines: list[str] = []
        code, digest = run_stage(commands[i], on_line=lines.append, timeout=900,
                                 env={"ALIGNFLOW_HOME": str(home)})
        results[i] = (code, digest, "\n".join(lines))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(commands))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.slow
def test_two_identical_runs_on_one_home_train_once(tmp_path):
    # Before: both staged into one tmp/dataset-<key> and one work directory; the second died,
    # or the first to finish deleted the other's checkpoints.
    cmds = [build_command("pretrain", TINY, [f"run.store={tmp_path / 'store'}", *ONE_RANK])
            for _ in range(2)]      # each its own master port, as two users' launches would be
    (a, b) = launch_together(cmds, tmp_path / "home")
    assert a[0] == 0, a[2][-3000:]
    assert b[0] == 0, b[2][-3000:]
    assert a[1] == b[1]
    trained = [r for r in (a, b) if "unchanged inputs: reusing" not in r[2]]
    assert len(trained) == 1, "identical runs must train once"
    waited = next(r for r in (a, b) if r is not trained[0])
    assert "waiting for it" in waited[2]
    store = ArtifactStore(tmp_path / "store")
    for name in ("tiny-pretrain", "tiny-pretrain-tokenizer", "tiny-pretrain-data"):
        assert len(store.versions(name)) == 1, name
    store.verify(a[1])
    assert not list((tmp_path / "home" / "tmp").glob("*"))   # every writer cleaned up after itself


@pytest.mark.slow
def test_identical_training_in_two_homes_gives_one_digest(tmp_path):
    # Before: identical weights, two digests, because the artifact carried the run's timings.
    digests = []
    for home in ("a", "b"):
        cmd = build_command("pretrain", TINY, [f"run.store={tmp_path / home / 'store'}",
                                               *ONE_RANK])
        ((code, digest, out),) = launch_together([cmd], tmp_path / home / "home")
        assert code == 0, out[-3000:]
        digests.append(digest)
    assert digests[0] == digests[1]
    a, b = (ArtifactStore(tmp_path / h / "store").get(d) for h, d in zip("ab", digests))
    assert a.manifest["perf_log"] and a.manifest["perf_log"] != b.manifest["perf_log"]
