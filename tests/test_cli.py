"""The ``align-gen`` command: bad input is one line on stderr and exit status 2 (never a
traceback); ``sample`` writes a grid, ``evaluate`` a JSON summary (its other outputs are tested
in test_evaluation_suite.py), ``train`` a final model.

Most cases call :func:`align_gen.cli.main` in-process; a few run the real command in a
subprocess to prove the exit status and the absence of a traceback end to end.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from align_gen.cli import main

TINY_CONFIG = (
    Path(__file__).resolve().parents[1] / "configs" / "tiny" / "ddpo_tiny_compressibility.yaml"
)
MODEL = "align-gen:tiny-random-sd"
NAN_REWARD = "test_nan_reward"


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``align-gen ARGV``; one string argument is split like a
    shell command line."""
    if len(argv) == 1 and isinstance(argv[0], str):
        argv = tuple(shlex.split(argv[0]))
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, command: str, *fragments: str) -> str:
    """Exit status 2 and stderr == exactly one line ``align-gen COMMAND: error: ...``."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith(f"align-gen {command}: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert code == 2
    return lines[0]


def assert_error_line_after_progress(code: int, err: str, command: str, *fragments: str) -> str:
    """As :func:`assert_one_line_error` for a failure that happens mid-run, after progress bars
    and library warnings went to stderr: exactly one error line, one line long, no traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("align-gen ")]
    assert len(errors) == 1, err
    assert err.splitlines()[-1] == errors[0], "the error must be the last thing printed"
    assert errors[0].startswith(f"align-gen {command}: error: "), err
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    assert code == 2
    return errors[0]


@pytest.fixture(autouse=True)
def quiet_library_warnings():
    """diffusers warns on every pipeline cast (reported separately). Its stderr handler is created
    once per process, so under capsys it can hold a closed stream of an earlier test and print a
    '--- Logging error ---' traceback; only errors from the libraries are kept here."""
    from diffusers.utils import logging as diffusers_logging

    before = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    yield
    diffusers_logging.set_verbosity(before)


@pytest.fixture
def empty_prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "empty.txt"
    path.write_text("\n   \n")  # blank lines only
    return path


@pytest.fixture
def nan_reward(register_test_reward) -> str:
    """A reward registered in Python (the declared way in) that returns NaN for every image."""

    @register_test_reward(NAN_REWARD)
    def nan_reward(images, prompts):
        return torch.full((images.shape[0],), float("nan"))

    return NAN_REWARD


# --------------------------------------------------------------------------------------------
# train: bad input


def train_args(tmp_path: Path, *overrides: str) -> list[str]:
    return ["train", str(TINY_CONFIG), f"output_dir={tmp_path / 'run'}", *overrides]


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (
            ["train.learning_rat=1e-4"],
            [
                "unknown config key 'train.learning_rat'",
                "Did you mean 'learning_rate'?",
                "Valid keys here:",
            ],
        ),
        (["sample.num_steps=abc"], ["sample.num_steps must be of type int, got 'abc' (str)"]),
        (["model.lora.enabled=3"], ["model.lora.enabled must be of type bool"]),
        (["model.dtype=float64"], ["model.dtype must be one of 'float32', 'float16', 'bfloat16'"]),
        (["objective.name=dpo"], ["unknown objective 'dpo'", "Valid: ", "ddpo"]),
        (["sample.batch_size=3", "sample.samples_per_prompt=2"], ["must be a multiple of"]),
        (["epochs"], ["override 'epochs' must look like key.sub=value"]),
    ],
    ids=[
        "unknown-key",
        "wrong-type",
        "wrong-bool",
        "bad-choice",
        "unknown-objective",
        "batch",
        "no-equals",
    ],
)
def test_train_config_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, overrides: list[str], fragments: list[str]
) -> None:
    code, out, err = run(capsys, *train_args(tmp_path, *overrides))
    assert_one_line_error(code, err, "train", *fragments)
    assert out == ""
    assert not (tmp_path / "run").exists()  # nothing is written for an invalid config


def test_train_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "train", tmp_path / "nope.yaml")
    assert_one_line_error(code, err, "train", "config file not found:", "nope.yaml")


def test_train_invalid_yaml_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("sample: [1, 2\n")
    code, _, err = run(capsys, "train", path)
    assert_one_line_error(code, err, "train", "is not valid YAML")


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("prompts.source=/nonexistent.txt", ["prompts file not found: /nonexistent.txt"]),
        ("prompts.source=builtin:nope", ["unknown built-in prompt list 'nope'", "shapes"]),
        ("reward.weights={nope: 1.0}", ["unknown reward 'nope'", "jpeg_compressibility"]),
        ("reward.weights={}", ["reward weights are empty"]),
        (
            "reward.weights={'no_such_module_xyz:fn': 1.0}",
            ["'no_such_module_xyz:fn' looks like a 'module:function' spec", "entry point"],
        ),
    ],
    ids=[
        "missing-prompts",
        "unknown-builtin-prompts",
        "unknown-reward",
        "no-reward",
        "module-spec-reward",
    ],
)
def test_train_input_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, override: str, fragments: list[str]
) -> None:
    code, _, err = run(capsys, *train_args(tmp_path, override))
    assert_one_line_error(code, err, "train", *fragments)


def test_train_empty_prompt_list(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, empty_prompt_file: Path
) -> None:
    code, _, err = run(capsys, *train_args(tmp_path, f"prompts.source={empty_prompt_file}"))
    assert_one_line_error(code, err, "train", f"the prompt list {empty_prompt_file} is empty")


def test_train_bad_jsonl_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a red circle"}\n{"text": "no prompt field"}\n')
    code, _, err = run(capsys, *train_args(tmp_path, f"prompts.source={path}"))
    assert_one_line_error(
        code, err, "train", f'{path}:2: expected a JSON object with a "prompt" field'
    )


@pytest.mark.usefixtures("single_thread")
def test_train_nan_reward_stops_the_run(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    nan_reward: str,
    tiny_train_overrides: list[str],
) -> None:
    code, _, err = run(
        capsys, *train_args(tmp_path, *tiny_train_overrides, f'reward.weights={{"{nan_reward}": 1.0}}')
    )
    assert_error_line_after_progress(code, err, "train", nan_reward, "NaN", "2 of 2")
    assert not (tmp_path / "run" / "final").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------------------------
# train: the happy path, then sampling from the run's final/ folder


@pytest.mark.usefixtures("single_thread")
def test_train_then_sample_the_final_lora(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    prompt_file: Path,
    tiny_train_overrides: list[str],
) -> None:
    code, out, err = run(
        capsys,
        *train_args(
            tmp_path,
            *tiny_train_overrides,
            "model.lora.enabled=true",
            f"prompts.source={prompt_file}",
        ),
    )
    assert code == 0, err
    run_dir = tmp_path / "run"
    assert "reward (mean over samples): first epoch" in out
    assert f"final model    {run_dir / 'final'}" in out
    assert json.loads((run_dir / "final" / "align_gen_model.json").read_text()) == {
        "base_model": MODEL,
        "kind": "lora",
    }
    code, out, err = run(
        capsys,
        f"sample {run_dir / 'final'} --prompts {prompt_file} --steps 2 --out {tmp_path / 'g.png'}",
    )
    assert code == 0, err
    assert (tmp_path / "g.png").is_file()


# --------------------------------------------------------------------------------------------
# sample and evaluate


@pytest.mark.usefixtures("single_thread")
def test_sample_writes_a_grid(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, prompt_file: Path
) -> None:
    """2 prompts x 2 seeds of 64 px images (32 x 32 latents, VAE factor 2), upscaled x2 to the
    128 px minimum cell: 2 columns = 256 px wide. Each caption, e.g. "a blue square (seed 1)",
    wraps to the cell's width less 6 px in the default font (one line with Pillow's FreeType
    default font, two with its older bitmap font), lines of 12 px + 6 px padding, so a row is
    128 px + the caption and 2 rows are twice that. Before the slow steps the command says what
    it does."""
    from PIL import ImageFont

    from pipelines.grid import wrap_caption

    out_path = tmp_path / "nested" / "g.png"
    code, out, err = run(
        capsys, f"sample {MODEL} --prompts {prompt_file} --seeds 0 1 --steps 2 --out {out_path}"
    )
    assert code == 0, err
    assert out.splitlines() == [
        f"loading {MODEL} ...",
        "sampling 2 prompts x 2 seeds (2 steps each) ...",
        f"wrote {out_path} (2 prompts x 2 seeds)",
    ]
    font = ImageFont.load_default()
    labels = [f"{p} (seed {s})" for p in ("a red circle", "a blue square") for s in (0, 1)]
    caption_h = 12 * max(len(wrap_caption(label, 128 - 6, font)) for label in labels) + 6
    with Image.open(out_path) as image:
        assert image.format == "PNG"
        assert image.size == (256, 2 * (128 + caption_h))
        white = (255, 255, 255)
        assert image.getpixel((64, 64)) != white or image.getpixel((192, 64)) != white


@pytest.mark.usefixtures("single_thread")
def test_evaluate_writes_json_and_prints_a_table(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, prompt_file: Path
) -> None:
    out_path = tmp_path / "e.json"
    code, out, err = run(
        capsys,
        f"evaluate {MODEL} --reward jpeg_compressibility --reward jpeg_incompressibility "
        f"--prompts {prompt_file} --seeds 0 --steps 2 --out {out_path}",
    )
    assert code == 0, err
    report = json.loads(out_path.read_text())
    assert report["model"] == MODEL and report["seeds"] == [0] and report["lora"] is None
    rows = report["rewards"]
    assert set(rows) == {"jpeg_compressibility", "jpeg_incompressibility"}
    for row in rows.values():
        assert {"mean", "std", "n", "ci_low", "ci_high"} <= set(row)
        assert row["n"] == 2  # 2 prompts x 1 seed
        assert row["std"] >= 0
    # both rewards scored the same images: +size and -size
    assert rows["jpeg_compressibility"]["mean"] < 0
    assert rows["jpeg_incompressibility"]["mean"] == pytest.approx(
        -rows["jpeg_compressibility"]["mean"]
    )
    lines = out.splitlines()
    start = lines.index(f"A = {MODEL}")  # after what it loaded and sampled
    assert lines[:start] == ["loading rewards: jpeg_compressibility, jpeg_incompressibility ...", f"loading A: {MODEL} ...",
                             "sampling A: 2 prompts x 1 seeds (2 steps each) ..."]
    lines = lines[start + 1 :]
    assert lines[0].split() == ["reward", "model", "mean", "std", "95%", "CI", "n"]
    for line, (name, row) in zip(lines[1:3], rows.items(), strict=True):
        interval = [f"[{row['ci_low']:.4f},", f"{row['ci_high']:.4f}]"]
        assert line.split() == [name, "A", f"{row['mean']:.4f}", f"{row['std']:.4f}", *interval, "2"]
    assert lines[-1] == f"wrote {out_path}"  # a .json --out: the summary only (the former output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json", "prompts.txt"]


def test_evaluate_unknown_reward(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, prompt_file: Path
) -> None:
    code, _, err = run(
        capsys,
        f"evaluate {MODEL} --reward jpeg_compresibility --prompts {prompt_file} --out {tmp_path / 'e.json'}",
    )
    assert_one_line_error(
        code,
        err,
        "evaluate",
        "unknown reward 'jpeg_compresibility'",
        "Did you mean 'jpeg_compressibility'?",
    )
    assert not (tmp_path / "e.json").exists()


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (
            ["clip_score.pretrained=/x.pt"],
            ["--reward-option names rewards not given with --reward: clip_score"],
        ),
        (
            ["jpeg_compressibility.nope=1"],
            ["reward 'jpeg_compressibility' has no option 'nope'", "quality"],
        ),
    ],
)
def test_evaluate_bad_reward_options(
    capsys: pytest.CaptureFixture[str], prompt_file: Path, options: list[str], fragments: list[str]
) -> None:
    argv = ["evaluate", MODEL, "--reward", "jpeg_compressibility", "--prompts", prompt_file]
    for option in options:
        argv += ["--reward-option", option]
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, "evaluate", *fragments)


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_missing_and_empty_prompt_files(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str, empty_prompt_file: Path
) -> None:
    extra = ["--reward", "jpeg_compressibility"] if command == "evaluate" else []
    code, _, err = run(capsys, command, MODEL, "--prompts", "/nonexistent.txt", *extra)
    assert_one_line_error(code, err, command, "prompts file not found: /nonexistent.txt")
    code, _, err = run(capsys, command, MODEL, "--prompts", empty_prompt_file, *extra)
    assert_one_line_error(code, err, command, "is empty")


@pytest.mark.parametrize(
    ("model", "fragment"),
    [
        ("./no/such/model", "model folder not found: ./no/such/model"),
        ("align-gen:tiny-random-kandinsky", "unknown built-in model 'align-gen:tiny-random-kandinsky'"),
    ],
)
def test_sample_missing_model(
    capsys: pytest.CaptureFixture[str], prompt_file: Path, model: str, fragment: str
) -> None:
    code, _, err = run(capsys, "sample", model, "--prompts", prompt_file)
    assert_one_line_error(code, err, "sample", fragment)


@pytest.mark.usefixtures("single_thread")
def test_sample_missing_lora(capsys: pytest.CaptureFixture[str], prompt_file: Path) -> None:
    code, _, err = run(capsys, "sample", MODEL, "--prompts", prompt_file, "--lora", "/no/such/lora")
    assert_error_line_after_progress(code, err, "sample", "LoRA weights not found: /no/such/lora")


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize(
    ("command", "flag"),
    [("sample", "--steps"), ("sample", "--eta"), ("evaluate", "--batch-size")],
)
def test_sampling_flags_must_be_positive(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, prompt_file: Path, command: str, flag: str
) -> None:
    extra = ["--reward", "jpeg_compressibility"] if command == "evaluate" else []
    code, _, err = run(
        capsys,
        *f"{command} {MODEL} --prompts {prompt_file} --steps 2 {flag} 0 --out {tmp_path / 'out'}".split(),
        *extra,
    )
    line = assert_error_line_after_progress(code, err, command)
    assert flag.lstrip("-").replace("-", "_") in line.replace("-", "_")  # names the flag


def test_argparse_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["sample", MODEL])  # --prompts is required
    assert info.value.code == 2
    assert "the following arguments are required: --prompts" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# the real command, in a subprocess


def command_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_subprocess_error_exits_2_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "align_gen.cli",
            "train",
            str(TINY_CONFIG),
            "train.learning_rat=1e-4",
        ],
        capture_output=True,
        text=True,
        env=command_env(),
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert_one_line_error(
        result.returncode, result.stderr, "train", "unknown config key 'train.learning_rat'"
    )
    assert result.stdout == ""


def test_console_script_error_exits_2_without_traceback(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("align-gen")
    if not script.is_file():
        pytest.skip(f"no align-gen console script next to {sys.executable}")
    result = subprocess.run(
        [str(script), "evaluate", MODEL, "--reward", "nope", "--prompts", "builtin:shapes"],
        capture_output=True,
        text=True,
        env=command_env(),
        cwd=tmp_path,
        timeout=120,
    )
    assert_one_line_error(result.returncode, result.stderr, "evaluate", "unknown reward 'nope'")


def test_nan_reward_fixture_is_a_real_reward(nan_reward: str) -> None:
    """The NaN test above fails for the right reason: the name resolves to our function, and the
    registry's output check is what rejects it."""
    from align_gen.errors import RewardError
    from reward_models import build_reward

    reward = build_reward({nan_reward: 1.0})
    with pytest.raises(RewardError, match="returned NaN or inf for 2 of 2 images"):
        reward(torch.rand(2, 3, 8, 8), ["a", "b"])


# --------------------------------------------------------------------------------------------
# bad input: one line, exit 2, before any model loads


@pytest.fixture
def latin1_prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts_latin1.txt"
    path.write_bytes("a red café\n".encode("latin-1"))
    return path


def test_a_prompt_file_that_is_not_utf8_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, latin1_prompt_file: Path
) -> None:
    code, _, err = run(capsys, *train_args(tmp_path, f"prompts.source={latin1_prompt_file}"))
    assert_one_line_error(code, err, "train", f"{latin1_prompt_file} is not UTF-8 text (byte 0xe9 at offset 9)")
    code, _, err = run(capsys, f"sample {MODEL} --prompts {latin1_prompt_file} --out {tmp_path / 'g.png'}")
    assert_one_line_error(code, err, "sample", "is not UTF-8 text")


@pytest.mark.parametrize("command", ["sample", "evaluate-folder", "evaluate-json"])
def test_an_output_path_under_a_file_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, prompt_file: Path, command: str
) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("a user's file")
    out = {"sample": blocker / "g.png", "evaluate-folder": blocker / "eval", "evaluate-json": blocker / "e.json"}[command]
    verb = command.split("-")[0]
    rewards = "--reward jpeg_compressibility " if verb == "evaluate" else ""
    code, _, err = run(capsys, f"{verb} {MODEL} {rewards}--prompts {prompt_file} --out {out}")
    assert_one_line_error(code, err, verb, f"{blocker} is a file")
    assert blocker.read_text() == "a user's file"


def test_sample_out_that_is_a_folder_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path, prompt_file: Path) -> None:
    code, _, err = run(capsys, f"sample {MODEL} --prompts {prompt_file} --out {tmp_path}")
    assert_one_line_error(code, err, "sample", f"{tmp_path} is a folder")


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.adam_beta1=2", "train.adam_beta1 must be in [0, 1), got 2.0"),
        ("train.adam_beta2=1", "train.adam_beta2 must be in [0, 1)"),
        ("train.weight_decay=-0.1", "train.weight_decay must be >= 0"),
        ("sample.resolution=33", "sample.resolution=33 does not fit this model: image sides must be a positive multiple of 2"),
    ],
)
def test_values_the_optimizer_or_model_would_reject_are_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, override: str, fragment: str
) -> None:
    code, _, err = run(capsys, *train_args(tmp_path, override))
    assert_one_line_error(code, err, "train", fragment)


@pytest.mark.usefixtures("single_thread")
def test_resuming_with_the_other_training_mode_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_train_overrides: list[str]
) -> None:
    assert run(capsys, *train_args(tmp_path, *tiny_train_overrides, "model.lora.enabled=false"))[0] == 0
    code, _, err = run(
        capsys,
        *train_args(tmp_path, *tiny_train_overrides, "epochs=2", "resume=latest", "model.lora.enabled=true",
                    "allow_config_changes=true"),
    )
    assert_one_line_error(code, err, "train", "holds a full fine-tune, but model.lora.enabled=true")


def test_a_missing_hub_diffusion_model_is_named_a_diffusion_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, *train_args(tmp_path, "model.pretrained=nobody/not-a-cached-model"))
    line = assert_error_line_after_progress(code, err, "train", "cannot load the diffusion model 'nobody/not-a-cached-model'")
    assert "vision-language" not in line


def test_a_config_naming_code_to_run_is_refused_and_nothing_runs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A downloaded config cannot execute code: `os:system` is not a reward name."""
    marker = tmp_path / "pwned"
    config = tmp_path / "downloaded.yaml"
    config.write_text(
        f"output_dir: {tmp_path / 'run'}\n"
        f'reward:\n  weights: {{"os:system": 1.0}}\n  options: {{"os:system": {{command: "touch {marker}"}}}}\n'
    )
    code, _, err = run(capsys, "train", config)
    assert_error_line_after_progress(code, err, "train", "'os:system' looks like a 'module:function' spec")
    assert not marker.exists()


def test_config_errors_come_before_the_model_libraries_load(tmp_path: Path) -> None:
    """A bad config is reported without importing diffusers, transformers or accelerate (their
    import is what made such errors take tens of seconds on a cold machine)."""
    script = (
        "import sys\n"
        "from align_gen.cli import main\n"
        f"code = main(['train', {str(TINY_CONFIG)!r}, 'train.learning_rat=1'])\n"
        "print(code, sorted(m for m in ('diffusers', 'transformers', 'accelerate') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=command_env(),
                            cwd=tmp_path, timeout=120)
    assert result.stdout.split("\n")[0] == "2 []", result.stdout + result.stderr
