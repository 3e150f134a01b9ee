"""exercises.py: every exercise's tests fail on its stub and pass on the solution; the student
command writes a copy, says "not yet" on the stub and "solved" once the body is back."""
import ast
import os
import shutil
import subprocess
import sys

from tools import exercises as E

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_stub_fails_its_tests_and_every_solution_passes():
    failures = E.verify(range(1, len(E.EXERCISES) + 1))
    assert not failures, "\n\n".join(failures)


def test_at_least_ten_exercises_over_all_methods_and_both_kernels():
    paths = {ex.path for ex in E.EXERCISES}
    assert len(E.EXERCISES) >= 10
    assert {"dino.py", "simdino.py", "dinov2.py", "simdinov2.py", "kernels/attention.py",
            "kernels/coding_rate.py"} <= paths


def test_stub_keeps_the_signature_and_docstring_and_only_raises():
    for number, ex in enumerate(E.EXERCISES, 1):
        with open(os.path.join(ROOT, ex.path), encoding="utf-8") as f:
            source = f.read()
        before = E.find_function(ast.parse(source), ex.function)
        after = E.find_function(ast.parse(E.stub_source(source, ex, number)), ex.function)
        assert ast.dump(before.args) == ast.dump(after.args), ex.name
        assert ast.get_docstring(before) == ast.get_docstring(after), ex.name
        body = after.body[1:] if ast.get_docstring(after) else after.body
        assert len(body) == 1 and isinstance(body[0], ast.Raise), ex.name


def test_every_exercise_is_in_the_classroom_page():
    with open(os.path.join(ROOT, "docs", "CLASSROOM.md"), encoding="utf-8") as f:
        page = f.read()
    missing = [ex.name for ex in E.EXERCISES if f"`{ex.name}`" not in page]
    assert not missing, f"docs/CLASSROOM.md's exercise table lacks {missing}"


def test_student_command_not_yet_then_solved(tmp_path):
    E.copy_project(tmp_path)
    run = lambda *a: subprocess.run([sys.executable, os.path.join("tools", "exercises.py"), *a], cwd=tmp_path,
                                    capture_output=True, text=True, timeout=300)
    first = run("3")                                      # ema: writes the copy, its tests fail
    student_file = tmp_path / "exercises" / "03_ema" / "train.py"
    assert first.returncode == 1 and "not yet" in first.stdout, first.stdout[-2000:]
    assert "exercise 3: ema_update is yours to write" in student_file.read_text()
    shutil.copy(os.path.join(ROOT, "train.py"), student_file)   # the student writes the body
    second = run("3")
    assert second.returncode == 0 and "solved" in second.stdout, second.stdout[-2000:]
    bad = run("99")
    assert bad.returncode == 2 and "no exercise 99" in bad.stderr and len(bad.stderr.strip().splitlines()) <= 2
