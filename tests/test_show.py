"""``mmoffload show``: one sample or micro batch as JSON with field names."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from typer.testing import CliRunner

from mmoffload.contract import rundir
from mmoffload.contract.wire import read_rank_file, read_training_batch
from mmoffload.demo import run_demo
from mmoffload_cli.app import app


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(run_demo(tmp_path_factory.mktemp("demo")).runs[0].run_dir)


def show(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["show", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def test_show_full_round_trips_every_field_of_a_demo_sample(run: Path) -> None:
    code, out, _ = show(run, "--sample", "1", "--full")
    document = json.loads(out)
    sample = read_training_batch(rundir.training_batch_path(run, 0)).examples[1]

    assert code == 0
    assert (document["type"], document["step"], document["index"]) == ("TrainingSample", 0, 1)
    record = document["record"]
    assert list(record) == list(sample.__struct_fields__)
    for name in sample.__struct_fields__:
        value = getattr(sample, name)
        if name == "mm_refs":
            assert record[name] == {"images": [msgspec.structs.asdict(ref) for ref in value.images]}
        else:
            assert record[name] == msgspec.to_builtins(value), name


def test_show_summarises_per_token_arrays_of_a_micro_batch(run: Path) -> None:
    code, out, _ = show(run, "--rank", "0", "--micro-batch", "0")
    record = json.loads(out)["record"]
    batch = read_rank_file(rundir.rank_path(run, 0, 0))[0]

    assert code == 0
    assert record["input_ids"] == {
        "length": len(batch.input_ids),
        "head": batch.input_ids[:8],
        "tail": batch.input_ids[-8:],
    }
    assert record["loss_mask"]["true"] == sum(batch.loss_mask)
    assert record["sequence_lengths"] == batch.sequence_lengths
    assert record["mm_refs"]["images"][0]["offset"] == batch.mm_refs.images[0].offset


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sample", "99"], "No sample 99: the file has 4 (0..3)"),
        (["--sample", "0", "--micro-batch", "0"], "Expected --sample or --rank/--micro-batch, not both"),
        (["--step", "7"], "No step 7 (steps: 0)"),
        (["--rank", "3"], "No rank 3 in step 0"),
    ],
)
def test_a_selection_that_does_not_exist_exits_2_with_one_line(
    run: Path, args: list[str], message: str
) -> None:
    code, out, err = show(run, *args)
    assert (code, out) == (2, "")
    assert message in err and len(err.strip().splitlines()) == 1


def test_audit_and_show_agree_on_what_a_rank_file_is(run: Path, tmp_path: Path) -> None:
    from mmoffload.audit import audit

    # `rank_a.bin` names no rank: both read it as the TrainingBatch it holds.
    loose = tmp_path / "rank_a.bin"
    loose.write_bytes(rundir.training_batch_path(run, 0).read_bytes())
    assert rundir.rank_of(loose) is None and rundir.rank_of(tmp_path / "rank_3.bin") == 3

    report = audit([loose], allowed_roots=[run / "assets"])
    assert (report.training_batches, report.rank_files) == (1, 0)
    code, out, _ = show(loose)
    assert code == 0 and json.loads(out)["type"] == "TrainingSample"
