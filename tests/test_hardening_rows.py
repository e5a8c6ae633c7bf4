"""Bad rows cannot kill or stall a long run: truncated and oversized images, non-UTF-8 bytes and broken JSON
are reported with file, line and field when the rows are read; over-long prompts are caught before the first
step; a row that breaks only when its batch is built is replaced and counted, and a resumed run does the same."""

from __future__ import annotations

import io
import json
import struct
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image

from tests.test_grpo import make_module, quiet_trainer
from vlrl.data import DataError, Files, RLDataModule
from vlrl.data.datamodule import prompt_tokens
from vlrl.models.inputs import encode_prompt

pytestmark = pytest.mark.timeout(300)


def png(size: tuple[int, int] = (16, 16), colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels (a decompression bomb's header) and holds none."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def write_lines(path: Path, lines: list[dict | bytes]) -> Path:
    path.write_bytes(
        b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)
    )
    return path


GOOD = {"question": "Colour?", "answer": "red"}


# ----------------------------------------------------------------- images checked whole when rows are read
@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_a_truncated_image_is_a_bad_row_when_the_rows_are_read(tmp_path, kind):
    whole = png((64, 64)) if kind == "png" else jpeg()
    (tmp_path / "ok.png").write_bytes(png())
    (tmp_path / "half.img").write_bytes(whole[: len(whole) // 2])  # the header reads; the pixels do not
    path = write_lines(tmp_path / "rows.jsonl", [{**GOOD, "images": ["ok.png"]}, {**GOOD, "images": ["half.img"]}])
    with pytest.raises(DataError) as caught:
        RLDataModule(train=Files(str(path)), batch_size=1).setup("fit")
    assert str(caught.value).startswith(f"{path} line 2: field 'images' image file ")
    assert "half.img cannot be read as an image" in str(caught.value) and caught.value.reason == "unreadable_image"
    data = RLDataModule(train=Files(str(path)), batch_size=1, on_bad_row="skip")
    with pytest.warns(UserWarning, match="Skipped 1 bad row"):
        data.setup("fit")
    assert data.skipped_rows == {"train/unreadable_image": 1}
    assert len(data.dataset("train")) == 1


def test_a_decompression_bomb_is_a_bad_row_naming_file_line_and_field(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_header_only(20_000, 20_000))
    path = write_lines(tmp_path / "rows.jsonl", [GOOD, {**GOOD, "images": ["bomb.png"]}, GOOD])
    with pytest.raises(DataError) as caught:
        Files(str(path)).load()
    message = str(caught.value)
    assert message.startswith(f"{path} line 2: field 'images' image file ")
    assert "400000000 pixels" in message and "MAX_IMAGE_PIXELS" in message  # 20000 x 20000
    assert caught.value.reason == "image_too_large"
    loaded = Files(str(path)).load("skip")
    assert len(loaded.rows) == 2 and loaded.skipped == {"image_too_large": 1}


# --------------------------------------------------------------------------- encodings and broken JSON
def test_a_non_utf8_byte_is_a_bad_row_with_its_line_and_column(tmp_path):
    path = write_lines(tmp_path / "rows.jsonl", [GOOD, b'{"question": "caf\xe9?", "answer": "1"}', GOOD])
    with pytest.raises(DataError) as caught:
        Files(str(path)).load()
    # '{' + '"question"' + ':' + ' ' + '"' + 'caf' = 17 bytes before the Latin-1 e-acute
    assert str(caught.value).startswith(f"{path} line 2: is not UTF-8 text: byte 0xe9 at column 18")
    assert caught.value.reason == "bad_encoding" and "iconv" in str(caught.value)
    loaded = Files(str(path)).load("skip")
    assert [row.id for row in loaded.rows] == ["rows:0", "rows:2"] and loaded.skipped == {"bad_encoding": 1}


def test_a_utf8_byte_order_mark_is_ignored(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert Files(str(path)).load().rows[0].question == "Colour?"


@pytest.mark.parametrize(
    ("line", "column"),
    [
        # '{"question": "Colour?", "answer": ' is 34 characters: the value is missing at column 35
        (b'{"question": "Colour?", "answer": ', 35),
        (b'{"question": "Colour?",}', 24),  # the brace after the trailing comma
        (b'{"question": "Colour?"} {"answer": 1}', 25),  # a second object on the line
    ],
)
def test_broken_json_names_the_column_on_its_own_line(tmp_path, line, column):
    path = write_lines(tmp_path / "rows.jsonl", [GOOD, line])
    with pytest.raises(DataError, match=rf"line 2: is not valid JSON: .* at column {column}, ") as caught:
        Files(str(path)).load()
    assert caught.value.reason == "malformed_json"


# ------------------------------------------------------------------------------ prompt length in tokens
def test_prompt_tokens_count_text_and_visual_tokens_as_the_processor_encodes_them(tmp_path):
    from vlrl.models import Policy

    _, processor = Policy("tiny:qwen2_5_vl", dtype="float32").load()
    (tmp_path / "a.png").write_bytes(png((56, 56)))
    (tmp_path / "b.png").write_bytes(png((300, 120)))
    rows = [{**GOOD, "images": ["a.png"]}, {**GOOD, "images": ["a.png", "b.png"], "question": "Which? " * 40}]
    data = RLDataModule(train=Files(str(write_lines(tmp_path / "rows.jsonl", rows))), max_pixels=20_000)
    dataset = data.dataset("train")
    counts = prompt_tokens(processor, dataset)
    for i, (text, visual) in enumerate(counts):
        prompt = dataset[i]
        encoded = encode_prompt(processor, prompt.messages, prompt.images)
        assert text + visual == encoded.token_inputs["input_ids"].shape[1]
    assert counts[1][1] > counts[0][1] > 0


def long_question_data(tmp_path: Path, on_bad_row: str) -> RLDataModule:
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(4)]
    rows.insert(2, {"question": "Why? " * 40_000, "answer": "1"})  # 200,000 characters
    path = write_lines(tmp_path / "rows.jsonl", rows)
    return RLDataModule(train=Files(str(path)), batch_size=2, on_bad_row=on_bad_row, shuffle=False)


def test_an_over_long_prompt_is_named_before_the_first_step(tmp_path):
    trainer = quiet_trainer(max_steps=1)
    with pytest.raises(DataError) as caught:
        trainer.fit(make_module(), datamodule=long_question_data(tmp_path, "error"))
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'rows.jsonl'} line 3: field 'question' makes a prompt of ")
    # the tiny model's max_position_embeddings is 4096; the module samples up to 8 new tokens
    assert "more than the 4088 allowed (the model config's max_position_embeddings=4096 - " in message
    assert caught.value.reason == "prompt_too_long"
    assert trainer.global_step == 0


def test_an_over_long_prompt_is_skipped_and_counted(tmp_path):
    data = long_question_data(tmp_path, "skip")
    trainer = quiet_trainer(max_steps=1)
    with pytest.warns(UserWarning, match=r"Skipped 1 train row\(s\) whose prompt is too long .*line 3"):
        trainer.fit(make_module(), datamodule=data)
    assert trainer.global_step == 1
    assert data.skipped_rows == {"train/prompt_too_long": 1}
    assert [row.id for row in data.dataset("train").rows] == ["rows:0", "rows:1", "rows:3", "rows:4"]
    assert float(trainer.callback_metrics["data/skipped/train/prompt_too_long"]) == 1.0


def test_max_prompt_tokens_is_validated():
    with pytest.raises(ValueError, match=r"data.max_prompt_tokens=0 must be a positive number of tokens"):
        RLDataModule(max_prompt_tokens=0)


# ------------------------------------------------------------- a row that breaks when its batch is built
def image_rows(tmp_path: Path, on_bad_row: str, num_workers: int = 0) -> RLDataModule:
    tmp_path.mkdir(exist_ok=True)
    for i in range(6):
        (tmp_path / f"{i}.png").write_bytes(png(colour=(40 * i, 0, 0)))
    rows = [{**GOOD, "images": [f"{i}.png"], "id": f"r{i}"} for i in range(6)]
    path = write_lines(tmp_path / "rows.jsonl", rows)
    data = RLDataModule(
        train=Files(str(path)), batch_size=2, shuffle=False, on_bad_row=on_bad_row, num_workers=num_workers
    )
    data.setup("fit")  # every image whole now
    image = tmp_path / "2.png"
    image.write_bytes(image.read_bytes()[:40])  # ... and row 2's cut short while the run goes on
    return data


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_row_that_fails_at_batch_time_is_replaced_and_counted(tmp_path, num_workers):
    data = image_rows(tmp_path, "skip", num_workers)
    with pytest.warns(UserWarning, match=r"Skipped a row that failed when its batch was built .*line 3"):
        batches = [list(batch.ids) for batch in data.train_dataloader()]
    # batches [0, 1], [2, 3], [4, 5]: row 2 is replaced by the next row not in its batch, row 4
    assert batches == [["r0", "r1"], ["r4", "r3"], ["r4", "r5"]]
    assert data.skipped_rows == {"train/unreadable_image": 1}


@pytest.mark.parametrize("position", [1, 2])
def test_a_resumed_run_builds_the_same_batches_and_counts(tmp_path, position):
    """Resuming before the bad row meets it again; resuming after it keeps its count from the checkpoint."""
    full = image_rows(tmp_path / "full", "skip")
    loader = full.train_dataloader()
    states = []
    with pytest.warns(UserWarning):
        for batch in loader:
            states.append((list(batch.ids), loader.state_dict()))
    resumed = image_rows(tmp_path / "resumed", "skip")
    loader = resumed.train_dataloader()
    loader.load_state_dict(states[position - 1][1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rest = [list(batch.ids) for batch in loader]
    assert rest == [ids for ids, _ in states[position:]]
    assert resumed.skipped_rows == full.skipped_rows == {"train/unreadable_image": 1}
    assert len(caught) == (1 if position == 1 else 0)  # met again, or known from the checkpoint
    assert states[-1][1]["replaced_rows"] == [[2, "unreadable_image"]]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_without_skip_a_row_failing_at_batch_time_is_a_data_error_naming_it(tmp_path, num_workers):
    data = image_rows(tmp_path, "error", num_workers)
    loader = iter(data.train_dataloader())
    assert list(next(loader).ids) == ["r0", "r1"]
    with pytest.raises(DataError, match=r"rows.jsonl line 3: field 'images' image file .*2.png cannot be read"):
        next(loader)
