"""Every bad input gets one clear error (docs/errors.md lists them, with the test behind each row).

Real components throughout: the built-in backbone and tokenizer, TRL, PEFT, safetensors, the ``rlhf``
CLI and stage modules in child processes. Disk-full is a real ``RLIMIT_FSIZE`` on a child process, and
the kill is a real SIGKILL while the stage sits inside ``artifacts.publish``.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cache import ArtifactCache
from stages.io import artifacts
from stages.io.backbone_files import BackboneError
from stages.io.config import BackboneSection, TaskSection, load_config
from stages.io.data import DataError, load_records, measure_lengths
from stages.io.devices import cuda_available
from stages.io.provenance import check_datasets
from stages.model.backbone import load_backbone, resolve_backbone
from stages.training.runner import USER_ERRORS
from tests.conftest import TINY, run_cli

SETS = [arg for item in TINY for arg in ("--set", item)]
TASK = TaskSection()
T = TypeVar("T")


# --- config -----------------------------------------------------------------------------------------


def test_cli_missing_config_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run_cli("run", "--config", "missing.yaml", "--run-id", "nocfg", cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.strip() == "error: missing.yaml: cannot read config: No such file or directory"
    assert not (tmp_path / "runs").exists()


# --- data -------------------------------------------------------------------------------------------


def test_non_utf8_jsonl_names_file_line_and_byte(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    good = b'{"prompt": "1+1=", "completion": "2"}\n'
    path.write_bytes(good + '{"prompt": "café", "completion": "2"}\n'.encode("latin-1"))
    with pytest.raises(DataError) as err:
        load_records(str(path), "sft", TASK)
    assert str(err.value) == (
        f"{path}: line 2: not valid UTF-8 (byte 0xe9 at byte 16 of the line); save the file as UTF-8"
    )
    # the same through the CLI's preflight: a DataError, which the CLI prints as one line with exit 2
    cfg = load_config(None, [f"data.sft={path}"])
    with pytest.raises(DataError, match="line 2: not valid UTF-8"):
        check_datasets(cfg)


def test_cli_non_utf8_data_is_one_line_exit_2_and_no_run(tmp_path: Path) -> None:
    path = tmp_path / "utf16.jsonl"
    path.write_text('{"prompt": "1+1=", "completion": "2"}\n', encoding="utf-16")  # a BOM, then 2 bytes a char
    result = run_cli("run", "--set", f"data.sft={path}", "--run-id", "utf16", cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert (
        result.stderr.strip() == f"error: {path}: line 1: not valid UTF-8 (byte 0xff at byte 1 of the line); "
        "save the file as UTF-8"
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ["data.sft=EXAMPLES/sft-messages.jsonl"],
            "data.sft hold conversational rows, but the tokenizer of "
            "backbone.name='builtin:tiny' has no chat template; use a chat model (builtin:tiny-chat is the built-in one) "
            "or plain-string data",
        ),
        (
            ["data.chat_template=always"],
            "data.chat_template=always, but the tokenizer of backbone.name='builtin:tiny' "
            "has no chat template; use a chat model (builtin:tiny-chat is the built-in one) or plain-string data",
        ),
        (
            [
                "backbone.name=builtin:tiny-chat",
                "data.eval=EXAMPLES/eval-conversational.jsonl",
                "data.chat_template=never",
            ],
            "data.eval hold conversational rows, which need the chat template, but data.chat_template=never",
        ),
        (
            ["backbone.name=builtin:tiny-chat", "data.preferences=EXAMPLES/preferences-ultrafeedback.jsonl"],
            "data.preferences hold conversational prompts and data.eval, data.sft plain-string ones: under "
            "data.chat_template=auto only the conversational ones go through the chat template, so the stages would see "
            "the same task in two formats; set data.chat_template: always, or make the datasets agree",
        ),
    ],
)
def test_conversational_data_without_a_chat_template_fails_before_the_run(
    tmp_path: Path, sets: list[str], message: str
) -> None:
    examples = str(Path(__file__).resolve().parents[1] / "examples" / "data")
    args = [arg for s in sets for arg in ("--set", s.replace("EXAMPLES", examples))]
    result = run_cli("run", *args, "--run-id", "template", cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.strip() == f"error: {message}"
    assert not (tmp_path / "runs").exists()


def test_preferences_too_few_prompts_to_hold_out_fail_before_the_run(tmp_path: Path) -> None:
    """Issue 14, fault 9: the reward stage holds out whole prompts; 4 pairs on one prompt leave nothing to
    hold out (or nothing to train on). Refused in pre-flight, naming the file, not after SFT has trained."""
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": f"2;{n}+1={n + 1}"}) + "\n" for n in range(4))
    )
    result = run_cli("run", "--set", f"data.preferences={path}", "--run-id", "split", cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.strip().startswith(f"error: {path}: 4 preference pairs over 1 distinct prompt(s) leave ")
    assert "at reward.eval_fraction=0.1 (whole prompts are held out)" in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("targets", "missing"),
    [("[query_key_value]", "query_key_value"), ("[q_proj, qkv]", "qkv"), ("'.*attn_qkv'", ".*attn_qkv")],
)
def test_lora_target_modules_that_match_nothing_fail_before_the_run(tmp_path: Path, targets: str, missing: str) -> None:
    """Issue 14, fault 4: named, with the layer names the backbone has, exit 2, no run folder."""
    result = run_cli("run", "--set", f"adapter.target_modules={targets}", "--run-id", "targets", cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.strip() == (
        f"error: adapter.target_modules: {missing} not found; the backbone has down_proj, "
        "gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj (or use all-linear)"
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(cuda_available(), reason="asks for a GPU where none is")
def test_backbone_device_cuda_without_a_gpu_fails_before_the_run(tmp_path: Path) -> None:
    result = run_cli("run", "--set", "backbone.device=cuda", "--run-id", "gpu", cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.strip() == (
        "error: backbone.device: cuda, but no CUDA device is visible here (check the driver "
        "and CUDA_VISIBLE_DEVICES), or set backbone.device: auto or cpu"
    )
    assert not (tmp_path / "runs").exists()


def test_empty_prompt_is_named(tmp_path: Path) -> None:
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "", "completion": "2"}\n')
    with pytest.raises(DataError) as err:
        load_records(str(path), "sft", TASK)
    assert str(err.value) == f"{path}: line 2: 'prompt' must be a non-empty string, got ''"


def test_files_without_rows_are_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=rf"^{re.escape(str(empty))}: no sft records$"):
        load_records(str(empty), "sft", TASK)
    no_rows = tmp_path / "empty.parquet"
    schema = pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string())])
    pq.write_table(schema.empty_table(), no_rows)
    with pytest.raises(DataError, match=rf"^{re.escape(str(no_rows))}: no preferences records$"):
        load_records(str(no_rows), "preferences", TASK)


@pytest.fixture(scope="module")
def tokenizer():
    return load_backbone(BackboneSection()).tokenizer


@pytest.fixture(scope="module")
def tokenization(tokenizer):
    from stages.model.tokenization import Tokenization

    return Tokenization.of(tokenizer)


def test_sft_over_length_rows_are_truncated_or_dropped_by_trl(tokenizer, tokenization, tmp_path: Path) -> None:
    """What TRL 1.16's SFTTrainer prepares from rows over ``max_length`` (``input_ids`` + ``completion_mask``,
    ``completion_only_loss=True``, default ``truncation_mode='keep_start'``) is exactly what the stage's own
    ``training_rows`` hands it; and ``measure_lengths`` counts exactly those rows."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from stages.sft.recipe import sft_dataset

    demos = [
        {"prompt": "1+1=", "completion": "2"},  # 4 + 1 + EOS = 6 tokens: fits in 8
        {"prompt": "12+13=", "completion": "25;3+4=7"},  # 6 + 8 + EOS = 15: cut to 8, losing its EOS
        {"prompt": "1+2+3+4+5=", "completion": "15"},  # the prompt alone is 10 tokens: no completion left
        {"prompt": "1+2+3=", "completion": "6;1+1=2"},  # 6 + 7 + EOS: cut to 8, two completion ids left
        {"prompt": "", "completion": "3+4=7;1+1=2"},  # language modelling: loss on all of it, cut at 8
    ]
    max_length = 8
    model = load_backbone(BackboneSection()).model
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_length=max_length,
        completion_only_loss=True,
        report_to="none",
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
    )
    pretokenized = []
    for demo in demos:
        prompt, completion = tokenization.pair(demo["prompt"], demo["completion"])
        pretokenized.append(
            {"input_ids": prompt + completion, "completion_mask": [0] * len(prompt) + [1] * len(completion)}
        )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(pretokenized), processing_class=tokenizer
    )
    rows = [row["input_ids"] for row in trainer.train_dataset]
    assert len(rows) == 4, "TRL drops a row whose completion is truncated away entirely"
    assert sorted(len(r) for r in rows) == [6, max_length, max_length, max_length]
    cut = rows[1]
    assert tokenizer.eos_token_id not in cut, "a truncated demonstration no longer ends with EOS"
    ours = sft_dataset(demos, tokenization, max_length)
    assert ours.to_list() == [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in trainer.train_dataset]

    report = measure_lengths(demos, "sft", "demos.jsonl", tokenization, max_length)
    assert (report.total, report.too_long, report.no_room) == (5, (2, 3, 4, 5), (3,))
    assert report.warning() == (
        "demos.jsonl: 4 of 5 sft records are longer than 8 tokens (records 2, 3, 4, 5); "
        "1 of them have no room for the response"
    )
    assert measure_lengths(demos[:1], "sft", "demos.jsonl", tokenization, max_length).warning() is None


def test_no_record_with_room_for_a_response_is_a_data_error(tokenization) -> None:
    demos = [{"prompt": "1+" * 10 + "1=", "completion": "11"}] * 2
    with pytest.raises(DataError, match="demos.jsonl: every sft record's prompt is at least 8 tokens long"):
        measure_lengths(demos, "sft", "demos.jsonl", tokenization, 8)


def test_preference_pairs_are_never_truncated(tokenization) -> None:
    """The reward model (and PPO/RRHF scoring) encodes prompt + response whole; ``measure_lengths`` counts
    the pairs longer than the backbone's context (128 positions for the built-in one)."""
    long_pair = {"prompt": "1+" * 70 + "1=", "chosen": "71", "rejected": "71;1+1=2"}
    short_pair = {"prompt": "1+1=", "chosen": "2", "rejected": "2;1+1=2"}
    batch = tokenization.batch([long_pair["prompt"]], [long_pair["rejected"]], "cpu")
    assert batch.input_ids.shape[1] == 142 + 8 + 1  # prompt + response + EOS, nothing cut
    report = measure_lengths([short_pair, long_pair], "preferences", "pairs.jsonl", tokenization, 128)
    assert (report.too_long, report.no_room) == ((2,), (2,))


# --- models -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("/no/such/backbone", "backbone.name='/no/such/backbone': no such folder, and not a hub id (NAME or ORG/NAME)"),
        ("./models/mine", "backbone.name='./models/mine': no such folder, and not a hub id (NAME or ORG/NAME)"),
        (
            "no-such-org/no-such-model",
            "backbone.name='no-such-org/no-such-model': not a local folder, and not in the "
            "local HF cache while HF_HUB_OFFLINE=1; download it first",
        ),
        (
            "builtin:huge",
            "backbone.name: unknown built-in backbone 'builtin:huge'; choose one of ['builtin:tiny', 'builtin:tiny-chat']",
        ),
    ],
)
def test_missing_backbone_is_one_user_error(name: str, expected: str) -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest: no hub here
    with pytest.raises(BackboneError) as err:
        resolve_backbone(BackboneSection(name=name))
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)
    assert isinstance(err.value, USER_ERRORS), "the CLI and stage runner print user errors as one line, exit 2"


def test_cli_missing_backbone_is_one_line_exit_2_and_no_run(tmp_path: Path) -> None:
    result = run_cli("run", "--set", "backbone.name=/no/such/backbone", "--run-id", "nobackbone", cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.strip() == (
        "error: backbone.name='/no/such/backbone': no such folder, and not a hub id (NAME or ORG/NAME)"
    )
    assert not (tmp_path / "runs").exists()


def _backbone_without(tmp_path: Path, tokens: tuple[str, ...]) -> Path:
    """The built-in backbone (weights symlinked) with its tokenizer saved without the ``tokens`` special tokens."""
    from transformers import AutoTokenizer

    source = Path(resolve_backbone(BackboneSection()))
    folder = tmp_path / "backbone"
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    for token in tokens:
        setattr(tokenizer, token, None)
    tokenizer.save_pretrained(str(folder))
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (folder / name).symlink_to(source / name)
    return folder


def test_tokenizer_without_pad_token_gets_eos_as_pad(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    folder = _backbone_without(tmp_path, ("pad_token",))
    assert AutoTokenizer.from_pretrained(str(folder)).pad_token is None  # the case under test is real
    backbone = load_backbone(BackboneSection(name=str(folder)))
    tokenizer = backbone.tokenizer
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert backbone.model.config.pad_token_id == tokenizer.eos_token_id
    batch = tokenizer(["1+1=", "12+13="], padding=True, return_tensors="pt")  # batching needs the pad token
    assert batch.input_ids[0, -1].item() == tokenizer.eos_token_id and batch.attention_mask[0, -1].item() == 0


def test_tokenizer_without_pad_or_eos_token_is_refused(tmp_path: Path) -> None:
    folder = _backbone_without(tmp_path, ("pad_token", "eos_token"))
    with pytest.raises(BackboneError, match="the tokenizer has neither a pad nor an eos token"):
        load_backbone(BackboneSection(name=str(folder)))


@pytest.fixture(scope="module")
def adapter_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A published (untrained) LoRA adapter artifact of the built-in backbone, and that backbone's fingerprint."""
    from stages.model.adapters import attach_adapter, save_adapter

    cfg = load_config()
    backbone = load_backbone(cfg.backbone)
    model = attach_adapter(backbone.model, cfg.adapter, "sft")
    final = tmp_path_factory.mktemp("artifact") / "sft"
    with artifacts.staging(final) as tmp:
        save_adapter(model, "sft", tmp / "adapter")
        artifacts.publish(tmp, final, {"stage": "sft", "backbone_fingerprint": backbone.fingerprint})
    return final, backbone.fingerprint


def _copy(artifact: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "sft"
    shutil.copytree(artifact, copy)  # real copies, so corrupting one leaves the fixture intact
    return copy


def test_adapter_from_another_backbone_is_refused(adapter_artifact: tuple[Path, str]) -> None:
    from stages.model.adapters import load_adapter

    folder, fingerprint = adapter_artifact
    other = "0123456789abcdef"
    with pytest.raises(artifacts.ArtifactError) as err:
        load_adapter(load_backbone(BackboneSection()).model, folder, "sft", other)
    assert str(err.value) == (
        f"{folder}: adapter was trained on backbone {fingerprint}, but this run's backbone is {other}"
    )


@pytest.mark.parametrize("damage", ["truncate", "garble", "delete"])
def test_corrupted_adapter_file_is_named(adapter_artifact: tuple[Path, str], tmp_path: Path, damage: str) -> None:
    from stages.model.adapters import load_adapter

    folder, fingerprint = adapter_artifact
    copy = _copy(folder, tmp_path)
    weights = copy / "adapter" / "adapter_model.safetensors"
    size = weights.stat().st_size
    if damage == "truncate":
        os.truncate(weights, size // 2)
    elif damage == "garble":
        with weights.open("r+b") as handle:  # same size, the last 64 bytes of tensor data overwritten
            handle.seek(size - 64)
            handle.write(b"\xff" * 64)  # not zeros: an untrained LoRA B matrix is all zeros already
    else:
        weights.unlink()
    what = {"delete": "is missing"}.get(
        damage, "is corrupted or changed since it was published (sha256 differs from the manifest)"
    )
    with pytest.raises(artifacts.ArtifactError) as err:
        load_adapter(load_backbone(BackboneSection()).model, copy, "sft", fingerprint)
    assert str(err.value) == f"{weights}: {what}; rerun the stage that produced {copy}"


def test_intact_adapter_copy_still_loads(adapter_artifact: tuple[Path, str], tmp_path: Path) -> None:
    from stages.model.adapters import load_adapter

    folder, fingerprint = adapter_artifact
    model = load_adapter(load_backbone(BackboneSection()).model, _copy(folder, tmp_path), "sft", fingerprint)
    assert "sft" in model.peft_config  # the control for the corruption tests: verification passes on a copy


def test_truncated_score_head_is_named(tmp_path: Path) -> None:
    import torch

    from stages.model.heads import load_head, save_head

    path = tmp_path / "score_head.safetensors"
    save_head(torch.nn.Linear(128, 1), path, "fp")
    assert load_head(path, 128, "fp", "cpu").weight.shape == (1, 128)  # intact, it loads
    with pytest.raises(artifacts.ArtifactError, match=r"head belongs to backbone fp, not other$"):
        load_head(path, 128, "other", "cpu")
    os.truncate(path, path.stat().st_size - 16)
    with pytest.raises(artifacts.ArtifactError, match=rf"^{re.escape(str(path))}: not a readable safetensors file"):
        load_head(path, 128, "fp", "cpu")


def test_garbled_manifest_is_an_artifact_error(tmp_path: Path) -> None:
    folder = tmp_path / "sft"
    folder.mkdir()
    (folder / artifacts.MANIFEST).write_bytes(b'{"stage": "sft", "artifact_dig\x00')
    with pytest.raises(artifacts.ArtifactError) as err:
        artifacts.verify(folder)
    assert str(err.value).startswith(f"{folder / artifacts.MANIFEST}: corrupted manifest (")


def test_cache_does_not_restore_a_corrupted_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def publish(final: Path) -> Path:
        with artifacts.staging(final) as tmp:
            (tmp / "adapter").mkdir()
            (tmp / "adapter" / "adapter_model.safetensors").write_bytes(b"weights" * 100)
            return artifacts.publish(tmp, final, {"cache_key": "k1"})

    cache = ArtifactCache(tmp_path / "cache")
    entry = cache.store("k1", publish(tmp_path / "run1" / "sft"))
    assert cache.lookup("k1") == entry
    with (entry / "adapter" / "adapter_model.safetensors").open("r+b") as handle:
        handle.write(b"garbage")
    assert cache.lookup("k1") is None, "a corrupted entry must be a cache miss"
    assert "adapter_model.safetensors: is corrupted" in capsys.readouterr().out
    with pytest.raises(artifacts.ArtifactError, match="cache has no finished entry"):
        cache.restore("k1", tmp_path / "run2" / "sft")
    # the stage then runs again, and storing its fresh artifact replaces the broken entry
    cache.store("k1", publish(tmp_path / "run3" / "sft"))
    restored = cache.restore("k1", tmp_path / "run2" / "sft")
    assert (restored / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights" * 100
    artifacts.verify(restored)


# --- runtime ----------------------------------------------------------------------------------------


def _limit_file_size(max_bytes: int) -> Callable[[], None]:
    """preexec_fn: writes past ``max_bytes`` fail with EFBIG, as on a full disk (SIGXFSZ would kill instead)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return limit


def test_manifest_write_failure_publishes_nothing(tmp_path: Path) -> None:
    # The manifest is the last file written: the limit applies only once the other files are in place.
    script = (
        "import resource, signal, sys\nfrom pathlib import Path\nfrom stages.io import artifacts\n"
        "final = Path(sys.argv[1])\n"
        "try:\n"
        "    with artifacts.staging(final) as tmp:\n"
        "        (tmp / 'weights.bin').write_bytes(b'x' * 4096)\n"
        "        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))\n"
        "        artifacts.publish(tmp, final, {'stage': 'test'})\n"
        "except artifacts.ArtifactError as err:\n"
        "    sys.exit(f'error: {err}')\n"
    )
    final = tmp_path / "sft"
    result = subprocess.run([sys.executable, "-c", script, str(final)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"error: {final}: not published: writing {final}/manifest.json failed "
        "(File too large); nothing was kept, free space (or raise the file-size limit) "
        "and rerun"
    )
    assert list(tmp_path.iterdir()) == [], "no manifest, no staging folder, no temp file may be left"


def test_disk_full_while_publishing_a_stage_then_rerun_succeeds(tmp_path: Path) -> None:
    out = tmp_path / "reward"
    command = [
        sys.executable,
        "-m",
        "stages.training.entry",
        "reward",
        "--out",
        str(out),
        *SETS,
        "--set",
        "tracking.backend=none",
    ]
    # The reward adapter's weights are ~330 kB: a 100 kB limit fails that write, inside the staging folder.
    full = subprocess.run(command, capture_output=True, text=True, timeout=600, preexec_fn=_limit_file_size(100_000))
    assert full.returncode == 2, full.stdout[-2000:] + full.stderr[-3000:]
    assert "Traceback" not in full.stderr
    assert full.stderr.strip().splitlines()[-1] == (
        f"error: {out}: not published: writing {out}/adapter/adapter_model.safetensors failed (File too large); "
        "nothing was kept, free space (or raise the file-size limit) and rerun"
    )
    assert list(tmp_path.iterdir()) == [], "no stage folder, no manifest, no leftover .reward.tmp-*"

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert artifacts.verify(out)["stage"] == "reward"
    assert [p.name for p in tmp_path.iterdir()] == ["reward"]


def _wait_for(find: Callable[[], T | None], process: subprocess.Popen, timeout: float) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = find()
        if found is not None:
            return found
        assert process.poll() is None, f"the run ended (status {process.returncode}) before the awaited moment"
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s")


def _pid_writing(out: Path) -> int:
    """The process whose command line has ``--out OUT`` (the stage the flow launched), from /proc."""
    wanted = str(out.resolve()).encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:  # the process ended while we looked
            continue
        if wanted in argv and b"--out" in argv:
            return int(cmdline.parent.name)
    raise AssertionError(f"no process writes {out}")


def _pause_before_publishing(folder: Path) -> Path:
    """A ``sitecustomize`` (imported by every Python process started with ``folder`` on its path) that
    makes the rename publishing a finished reward artifact wait, so the test can kill the stage with the
    manifest written and the artifact not yet in place: the fault is injected here, not in the product."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import os, time\n"
        "_replace = os.replace\n"
        "def _slow_replace(src, dst, *args, **kwargs):\n"
        "    if '.reward.tmp-' in os.fspath(src) and os.path.isfile(os.path.join(src, 'manifest.json')):\n"
        "        time.sleep(600)\n"
        "    return _replace(src, dst, *args, **kwargs)\n"
        "os.replace = _slow_replace\n"
    )
    return folder


def test_kill_during_publish_leaves_no_trusted_folder_and_rerun_finishes(tmp_path: Path) -> None:
    # A seed no other test uses, so the stage cannot come from the session's cache: it must really run.
    # TINY's reward.max_steps is below reward.checkpoint_every, so the artifact is the only thing published.
    args = [
        "run",
        *SETS,
        "--set",
        "run.stages=[reward]",
        "--set",
        "run.seed=17",
        "--set",
        "tracking.backend=none",
        "--run-id",
        "killed",
    ]
    run_dir = tmp_path / "runs" / "killed"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(_pause_before_publishing(tmp_path / "inject")), os.environ.get("PYTHONPATH", "")]
        ),
    }
    with (tmp_path / "first.log").open("w") as log:  # a file, not a pipe: a full pipe would stall the run
        cli = subprocess.Popen(
            [str(Path(sys.executable).parent / "rlhf"), *args],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            staged = _wait_for(lambda: next(run_dir.glob(".reward.tmp-*/manifest.json"), None), cli, timeout=400)
            os.kill(_pid_writing(run_dir / "reward"), signal.SIGKILL)  # inside publish, before the rename
            cli.wait(timeout=120)
        finally:
            if cli.poll() is None:
                cli.kill()
    first = (tmp_path / "first.log").read_text()
    assert cli.returncode == 1, first[-3000:]
    assert "error: stage reward failed (exit status -9)" in first
    assert not (run_dir / "reward").exists() and not artifacts.is_finished(run_dir / "reward")
    assert staged.is_file(), "the leftover holds a manifest, under a name no reader looks at"
    report = json.loads(run_cli("report", "killed", "--json", cwd=tmp_path).stdout)
    assert report["stages"]["reward"]["status"] == "failed" and report["stages"]["reward"]["artifact"] is None

    rerun = run_cli(*args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert (
        json.loads(run_cli("report", "killed", "--json", cwd=tmp_path).stdout)["stages"]["reward"]["status"]
        == "completed"
    )
    assert artifacts.verify(run_dir / "reward")["stage"] == "reward"
    assert not list(run_dir.glob(".reward.tmp-*")), "the next run of the stage removes the killed attempt's leftover"
