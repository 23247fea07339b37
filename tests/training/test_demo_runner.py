"""The demo build's step runner: slots run side by side, the commands of one slot one after the other, a
failure stops its slot and fails the step with the command's output, a finished step is skipped."""
import sys

import pytest

from fovea.training.demo_model import DemoPlan, Runner, main


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_slot_runs_its_commands_in_order_beside_the_others(tmp_path):
    runner = Runner(tmp_path / "log")
    first, second, beside = tmp_path / "first", tmp_path / "second", tmp_path / "beside"
    runner.run((_py(f"import time; time.sleep(0.3); open({str(first)!r}, 'w').write('1'); print('wrote first')"),
                # runs only after the first: it reads what the first wrote
                _py(f"open({str(second)!r}, 'w').write(open({str(first)!r}).read() + '2')")),
               _py(f"open({str(beside)!r}, 'w').write('b')"),
               done=[second, beside])
    assert second.read_text() == "12" and beside.read_text() == "b"
    log = (tmp_path / "log").read_text()
    assert "  then $ " in log and "wrote first" in log
    runner.run(_py("raise SystemExit(3)"), done=[second, beside])  # already built: not run
    assert "skipped (already built)" in (tmp_path / "log").read_text()


def test_a_failing_command_stops_its_slot_and_fails_the_step(tmp_path):
    runner = Runner(tmp_path / "log")
    never = tmp_path / "never"
    with pytest.raises(RuntimeError, match=r"failed \(5\):\n.*broken input"):
        runner.run((_py("print('broken input'); raise SystemExit(5)"), _py(f"open({str(never)!r}, 'w')")),
                   _py("print('fine')"))
    assert not never.exists()


def test_plan_options_reject_bad_sizes(capsys):
    assert DemoPlan().distill_image_sizes.split(",")[0] == "40"
    with pytest.raises(SystemExit):
        main(["--distill-image-sizes", "40,x", "--eval-only"])
    assert "--distill-image-sizes" in capsys.readouterr().err
