"""``ganglion demo``'s checks of its flags and trace, made before any service starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from ganglion.cli import main
from ganglion.cli.demo import load_tiresias


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--policy", "nope"], "unknown policy 'nope'; known: best-fit"),
        (["--timeout", "-5"], "--timeout must be > 0"),
        (["--time-scale", "0"], "--time-scale and --timeout must be > 0"),
        (["--hosts", "0"], "--hosts must be at least 1"),
    ],
)
def test_bad_flags_exit_2_before_starting_anything(
    flags: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["demo", *flags])
    assert done.value.code == 2
    assert said in capsys.readouterr().err


def test_a_trace_of_another_format_is_named_as_such(tmp_path: Path) -> None:
    philly = tmp_path / "philly.csv"
    philly.write_text(
        "timestamp,duration,num_gpus,gpu_time,cluster\n2017-10-09 07:01:55,66,1,66,x\n"
    )
    with pytest.raises(ValueError, match=r"not a Tiresias-format job CSV \(no job_id, num_gpu"):
        load_tiresias(philly)
    tiresias = tmp_path / "t.csv"
    tiresias.write_text(
        "job_id,num_gpu,submit_time,iterations,model_name,duration,interval\n"
        "7,2,30,100,resnet,600,5\n"
    )
    [job] = load_tiresias(tiresias)
    assert (job.job_id, job.gpus, job.submit_s, job.duration_s) == ("j7", 2, 30.0, 600.0)
