"""Data: real MATH-V rows, every source kind, bad rows, image sizing, the synthetic task, resuming."""

from __future__ import annotations

import io
import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from vlrl.data import (
    DataError,
    Files,
    HFDataset,
    RLDataModule,
    Source,
    Synthetic,
    fit_pixels,
    make_rows,
    save_split,
    strip_image_placeholders,
)
from vlrl.data.loader import ResumableSampler
from vlrl.data.synthetic import COLOURS, KINDS, main
from vlrl.types import PromptBatch

MATHV = Path(__file__).resolve().parent / "fixtures" / "mathv"


def _png(colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (20, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_jsonl(path: Path, lines: list[dict | str]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _text(batch: PromptBatch, i: int) -> str:
    return batch.messages[i][-1]["content"][-1]["text"]


# --- real rows -------------------------------------------------------------------------------------------------


def test_mathv_rows_become_prompts() -> None:
    data = RLDataModule(
        val=Files(str(MATHV / "data.jsonl"), data_source="mathv"), eval_batch_size=8, system_prompt="Think."
    )
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    assert isinstance(batch, PromptBatch) and len(batch) == 8
    assert batch.ids == ["4", "23", "35", "64", "75", "90", "923", "951"]
    assert all(answer for answer in batch.answers)
    assert set(batch.data_sources) == {"mathv"}
    for i in range(len(batch)):
        system, user = batch.messages[i]
        assert system == {"role": "system", "content": [{"type": "text", "text": "Think."}]}
        assert user["role"] == "user" and user["content"][0] == {"type": "image"}
        assert len(batch.images[i]) == 1 and batch.images[i][0].mode == "RGB"
        assert "<image" not in _text(batch, i)
        assert batch.extras[i]["subject"]  # other fields are kept
    by_id = {id_: i for i, id_ in enumerate(batch.ids)}
    assert batch.choices[by_id["4"]] is None
    assert _text(batch, by_id["4"]) == "How many different digits can you find in this picture?"
    mc = by_id["90"]
    assert batch.choices[mc] == ["5-4-3-2-1", "5-2-3-4-1", "5-4-2-3-1", "5-3-2-1-4", "5-2-3-1-4"]
    assert _text(batch, mc).endswith(
        "In which order are they collected?\nA. 5-4-3-2-1\nB. 5-2-3-4-1\nC. 5-4-2-3-1\nD. 5-3-2-1-4\nE. 5-2-3-1-4"
    )
    assert _text(batch, by_id["75"]).endswith("Which point is on his drawing?\nA.\nB.\nC.\nD.\nE.")
    assert "clock showed. When she" in _text(batch, by_id["923"])


def test_template_places_choices() -> None:
    data = RLDataModule(
        val=Files(str(MATHV / "data.jsonl")),
        prompt_template="Q: {question}\nOptions:\n{choices}\nAnswer with a letter.",
        eval_batch_size=8,
    )
    batch = next(iter(data.val_dataloader()))
    text = _text(batch, batch.ids.index("90"))
    assert text.endswith(
        "Options:\nA. 5-4-3-2-1\nB. 5-2-3-4-1\nC. 5-4-2-3-1\nD. 5-3-2-1-4\nE. 5-2-3-1-4\nAnswer with a letter."
    )
    assert text.startswith("Q: Five equally big")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['answer'\]"):
        RLDataModule(prompt_template="{question} {answer}")


def test_placeholder_removal() -> None:
    assert strip_image_placeholders("<image1>\nWhat is shown?") == "What is shown?"
    assert strip_image_placeholders("like this <image1>. Each\n<image2>\nWhat?") == "like this. Each\nWhat?"


def test_rows_with_messages_are_used_as_given(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_png())
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}
    _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [user], "image": "a.png", "answer": "red"}])
    data = RLDataModule(val=Files(str(tmp_path / "chat.jsonl")), system_prompt="ignored for chat rows")
    batch = next(iter(data.val_dataloader()))
    assert batch.messages == [[user]] and batch.ids == ["chat:0"] and len(batch.images[0]) == 1
    _write_jsonl(tmp_path / "bad.jsonl", [{"messages": [user], "answer": "red"}])
    with pytest.raises(DataError, match=r"bad.jsonl line 1: field 'messages' has 1 image part\(s\) but the row has 0"):
        Files(str(tmp_path / "bad.jsonl")).load()


# --- sources ---------------------------------------------------------------------------------------------------

MAPPING = {"problem": "question", "solution": "answer", "pic": "images"}


def _check_mapped(rows: list, n: int = 3) -> None:
    assert [row.question for row in rows] == [f"What is {i} + {i}?" for i in range(n)]
    assert [row.answer for row in rows] == [str(2 * i) for i in range(n)]
    assert all(len(row.images) == 1 for row in rows)


def test_jsonl_source_with_column_mapping(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png())
        lines.append({"problem": f"What is {i} + {i}?", "solution": 2 * i, "pic": [f"img/{i}.png"], "level": i})
    rows = Files(str(_write_jsonl(tmp_path / "train.jsonl", lines)), column_mapping=MAPPING).load().rows
    _check_mapped(rows)
    assert rows[0].id == "train:0" and rows[0].data_source == "train" and rows[2].extras == {"level": 2}
    assert Path(rows[0].images[0]) == tmp_path / "img" / "0.png"
    with pytest.raises(DataError, match=r"\['prob'\].*available columns: \['problem', 'solution', 'pic', 'level'\]"):
        Files(str(tmp_path / "train.jsonl"), column_mapping={"prob": "question"}).load()


def test_parquet_source_with_column_mapping(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "problem": [f"What is {i} + {i}?" for i in range(3)],
            "solution": [str(2 * i) for i in range(3)],
            "pic": [{"bytes": _png(), "path": None} for _ in range(3)],
        }
    )
    pq.write_table(table, tmp_path / "train.parquet")
    rows = Files(str(tmp_path / "train.parquet"), column_mapping=MAPPING).load().rows
    _check_mapped(rows)
    assert isinstance(rows[0].images[0], bytes)


def test_folder_source_reads_sorted_files(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(_png())
    for name, indices in (("b.jsonl", [1, 2]), ("a.jsonl", [0])):
        _write_jsonl(
            tmp_path / name,
            [{"problem": f"What is {i} + {i}?", "solution": str(2 * i), "pic": "x.png"} for i in indices],
        )
    (tmp_path / "notes.txt").write_text("not data")
    source = Files(str(tmp_path), column_mapping=MAPPING)
    assert [f.name for f in source.files()] == ["a.jsonl", "b.jsonl"]
    _check_mapped(source.load().rows)


def test_hf_saved_dataset_source(tmp_path: Path) -> None:
    import datasets

    features = datasets.Features(
        {"problem": datasets.Value("string"), "solution": datasets.Value("int64"), "pic": datasets.Image()}
    )
    rows = {
        "problem": [f"What is {i} + {i}?" for i in range(3)],
        "solution": [2 * i for i in range(3)],
        "pic": [Image.new("RGB", (8, 8), "red") for _ in range(3)],
    }
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    source = HFDataset(str(tmp_path / "ds"), column_mapping=MAPPING)
    loaded = source.load().rows
    _check_mapped(loaded)
    assert isinstance(loaded[0].images[0], bytes)  # undecoded until used
    data = RLDataModule(val=source, eval_batch_size=3)
    assert next(iter(data.val_dataloader())).images[2][0].getpixel((0, 0)) == (255, 0, 0)
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(
        str(tmp_path / "dd")
    )
    assert len(HFDataset(str(tmp_path / "dd"), split="test", column_mapping=MAPPING).load().rows) == 3
    with pytest.raises(DataError, match=r"no split 'train'; its splits are \['test'\]"):
        HFDataset(str(tmp_path / "dd"), column_mapping=MAPPING).load()


def test_sources_are_configurable_by_class_path() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(RLDataModule, "data")
    config = parser.parse_object(
        {
            "data": {
                "train": {"class_path": "vlrl.data.Synthetic", "init_args": {"split": "train", "size": 4}},
                "batch_size": 2,
            }
        }
    )
    data = parser.instantiate_classes(config).data
    assert isinstance(data.sources["train"], Synthetic) and isinstance(data.sources["train"], Source)
    assert len(next(iter(data.train_dataloader()))) == 2


# --- bad rows --------------------------------------------------------------------------------------------------

GOOD = {"question": "Colour?", "images": ["ok.png"], "answer": "red"}
BAD_ROWS = {
    "missing_answer": ({"question": "Colour?", "images": ["ok.png"]}, "answer", "is missing"),
    "unreadable_image": ({**GOOD, "images": ["broken.png"]}, "images", "cannot be read as an image"),
    "missing_image": ({**GOOD, "images": ["gone.png"]}, "images", "gone.png does not exist"),
    "malformed_json": ('{"question": "Colour?", "answer": "red"', None, "is not valid JSON"),
    "wrong_type": ({**GOOD, "question": 42}, "question", "is a int"),
    "missing_question": (
        {"images": ["ok.png"], "answer": "red"},
        "question",
        "is missing (the row has neither 'question' nor 'messages')",
    ),
}


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    (tmp_path / "ok.png").write_bytes(_png())
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    return tmp_path


@pytest.mark.parametrize("reason", list(BAD_ROWS))
def test_bad_row_is_reported_with_file_line_and_field(image_dir: Path, reason: str) -> None:
    bad, field, problem = BAD_ROWS[reason]
    path = _write_jsonl(image_dir / "rows.jsonl", [GOOD, bad])
    with pytest.raises(DataError) as caught:
        RLDataModule(train=Files(str(path)), batch_size=1).setup("fit")
    message = str(caught.value)
    assert message.startswith(f"{path} line 2: ")
    assert problem in message and "Fix: " in message and "on_bad_row: skip" in message
    if field:
        assert f"field '{field}'" in message
    assert caught.value.reason == reason


def test_bad_rows_are_skipped_and_counted(image_dir: Path) -> None:
    path = _write_jsonl(image_dir / "rows.jsonl", [GOOD, *(bad for bad, _, _ in BAD_ROWS.values()), GOOD])
    data = RLDataModule(train=Files(str(path)), batch_size=2, on_bad_row="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data.setup("fit")
    summaries = [w for w in caught if "Skipped 6 bad row(s) of train" in str(w.message)]
    assert len(summaries) == 1 and "line 3" in str(summaries[0].message)
    assert data.skipped_rows == {f"train/{reason}": 1 for reason in BAD_ROWS}
    assert len(data.dataset("train")) == 2
    assert [row.id for row in data.dataset("train").rows] == ["rows:0", "rows:7"]  # ids keep the row index


def test_answers_are_optional_when_the_source_says_so(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"question": "Describe it."}])
    assert Files(str(path), require_answer=False).load().rows[0].answer == ""
    _write_jsonl(tmp_path / "empty.jsonl", [{"question": "Q", "answer": "  "}])
    with pytest.raises(DataError, match="field 'answer' is empty"):
        Files(str(tmp_path / "empty.jsonl")).load()


def test_corrupt_image_body_is_reported_with_its_row(tmp_path: Path) -> None:
    (tmp_path / "cut.png").write_bytes(_png(size=(64, 64))[:60])  # header reads, pixels do not
    path = _write_jsonl(tmp_path / "rows.jsonl", [{**GOOD, "images": ["cut.png"]}])
    data = RLDataModule(val=Files(str(path)))
    with pytest.raises(DataError, match=r"rows.jsonl line 1: field 'images' image file .*cut.png cannot be read"):
        data.setup("validate")  # all of the image's data is checked with the row, not only its header


# --- images ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected_area"),
    [((400, 100), (1000, 2000)), ((10, 5), (1000, 2000)), ((40, 30), (1200, 1200)), ((3, 400), (1000, 2000))],
)
def test_images_fit_the_pixel_range(size: tuple[int, int], expected_area: tuple[int, int]) -> None:
    image = Image.new("RGB", size)
    out = fit_pixels(image, min_pixels=1000, max_pixels=2000)
    width, height = out.size
    assert expected_area[0] <= width * height <= expected_area[1]
    assert abs(width / height - size[0] / size[1]) <= 0.35 * size[0] / size[1]
    if 1000 <= size[0] * size[1] <= 2000:
        assert out is image


def test_datamodule_resizes_real_images() -> None:
    data = RLDataModule(val=Files(str(MATHV)), max_pixels=128 * 128, min_pixels=64 * 64, eval_batch_size=8)
    for batch in data.val_dataloader():
        for (image,) in batch.images:
            assert 64 * 64 <= image.width * image.height <= 128 * 128


# --- the synthetic task ----------------------------------------------------------------------------------------


def test_synthetic_is_deterministic(tmp_path: Path) -> None:
    first, second = make_rows("train", 24, seed=3), make_rows("train", 24, seed=3)
    assert [r["images"][0].tobytes() for r in first] == [r["images"][0].tobytes() for r in second]
    assert [(r["id"], r["question"], r["answer"], r["data_source"]) for r in first] == [
        (r["id"], r["question"], r["answer"], r["data_source"]) for r in second
    ]
    save_split(tmp_path / "a", "val", 12, seed=3)
    save_split(tmp_path / "b", "val", 12, seed=3)
    for file in sorted((tmp_path / "a").rglob("*.*")):
        assert file.read_bytes() == (tmp_path / "b" / file.relative_to(tmp_path / "a")).read_bytes()
    assert [r["images"][0].tobytes() for r in make_rows("train", 6, seed=4)] != [
        r["images"][0].tobytes() for r in first[:6]
    ]


def test_synthetic_splits_are_disjoint_and_cover_every_kind() -> None:
    drawn = {split: make_rows(split, 240) for split in ("train", "val", "test")}
    images = {split: {r["images"][0].tobytes() for r in rows} for split, rows in drawn.items()}
    assert not images["train"] & images["val"] and not images["train"] & images["test"]
    assert not images["val"] & images["test"]
    for rows in drawn.values():
        assert Counter(r["data_source"] for r in rows) == {kind: 40 for kind in KINDS}


def _foreground(image: Image.Image) -> np.ndarray:
    return (np.asarray(image) != 255).any(axis=-1)  # [H, W] not background


def test_synthetic_answers_match_the_pictures() -> None:
    rows = make_rows("test", 120, seed=1)
    palette = {name: np.array(rgb) for name, rgb in COLOURS.items()}
    for row in rows:
        image, kind, answer = row["images"][0], row["data_source"], row["answer"]
        pixels, mask = np.asarray(image).astype(int), _foreground(image)
        if kind == "color":
            colours = Counter(tuple(p) for p in pixels[mask])
            dominant = np.array(colours.most_common(1)[0][0])
            assert min(palette, key=lambda name: np.abs(palette[name] - dominant).sum()) == answer
            assert mask.mean() > 0.15
        elif kind == "position":
            ys, xs = np.nonzero(mask)
            half = image.width / 2
            centre = {
                "left": xs.mean() < half,
                "right": xs.mean() > half,
                "top": ys.mean() < half,
                "bottom": ys.mean() > half,
            }
            assert centre[answer]
        elif kind == "count":
            h = image.height // 2
            quadrants = [mask[:h, :h], mask[:h, h:], mask[h:, :h], mask[h:, h:]]
            assert sum(q.any() for q in quadrants) == int(answer)
        elif kind == "compare":
            areas = {name: (np.abs(pixels - rgb).sum(-1) == 0).sum() for name, rgb in palette.items()}
            assert max(areas, key=areas.get) == answer
        elif kind == "add":
            assert 2 <= int(answer) <= 10
        assert row["question"].endswith("?")


def test_synthetic_command_writes_readable_splits(tmp_path: Path) -> None:
    main([str(tmp_path), "--train-size", "6", "--val-size", "3", "--test-size", "3"])
    rows = Files(str(tmp_path / "train")).load().rows
    assert [row.id for row in rows] == [f"train-{i:05d}" for i in range(6)]
    assert [row.data_source for row in rows] == list(KINDS)
    assert (tmp_path / "val" / "images" / "val-00002.png").is_file()


def test_synthetic_source_feeds_the_datamodule() -> None:
    data = RLDataModule(train=Synthetic("train", size=12, image_size=28), batch_size=4, system_prompt=None)
    batch = next(iter(data.train_dataloader()))
    assert len(batch) == 4 and batch.messages[0][0]["role"] == "user"
    assert batch.images[0][0].size == (28, 28) and set(batch.data_sources) <= set(KINDS)


# --- the sampler ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("drop_last", "num_batches"), [(True, 2), (False, 3)])
def test_sampler_shards_a_seeded_order_over_ranks(drop_last: bool, num_batches: int) -> None:
    ranks = [ResumableSampler(11, 2, seed=5, drop_last=drop_last, rank=r, world_size=2) for r in range(2)]
    assert all(len(sampler) == num_batches for sampler in ranks)
    batches = [sampler.batches(epoch=1) for sampler in ranks]
    order = ranks[0].order(1).tolist()
    padded = order if drop_last else order + order[:1]  # to a multiple of the 2 ranks
    for j in range(num_batches):  # global batch j is a contiguous slice of the epoch's order
        assert sorted(batches[0][j] + batches[1][j]) == sorted(padded[4 * j : 4 * (j + 1)])
    seen = {i for rank in batches for batch in rank for i in batch}
    assert seen == (set(range(11)) if not drop_last else set(order[:8]))
    assert order == ResumableSampler(11, 2, seed=5).order(1).tolist() != ranks[0].order(2).tolist()


def test_sampler_state_survives_a_batch_size_change() -> None:
    sampler = ResumableSampler(40, batch_size=4, world_size=2)
    sampler.set_epoch(3)
    sampler.position = 3  # 24 rows consumed
    resumed = ResumableSampler(40, batch_size=6, world_size=2)
    resumed.load_state_dict(sampler.state_dict())
    assert (resumed.epoch, resumed.position) == (3, 2)
    resumed.set_epoch(4)
    assert resumed.position == 0


# --- resuming: the same data position after a restart ----------------------------------------------------------


class Recorder(LightningModule):
    """Records the ids of every training batch it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.seen: list[str] = []

    def training_step(self, batch: PromptBatch, batch_idx: int) -> torch.Tensor:
        assert isinstance(batch, PromptBatch)
        self.seen.extend(batch.ids)
        return self.layer(torch.ones(1, 2)).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(tmp_path: Path, max_steps: int, num_workers: int = 0, ckpt_path: Path | None = None) -> list[str]:
    data = RLDataModule(
        train=Synthetic("train", size=10, image_size=28), batch_size=3, seed=7, num_workers=num_workers
    )  # 3 batches per epoch
    model = Recorder()
    trainer = Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data, ckpt_path=ckpt_path)
    return model.seen


@pytest.mark.parametrize(
    ("resume_step", "num_workers", "position"), [(4, 0, (1, 1)), (6, 2, (1, 3))], ids=["mid-epoch", "epoch-boundary"]
)
def test_resume_continues_at_the_same_data_position(
    tmp_path: Path, resume_step: int, num_workers: int, position: tuple[int, int]
) -> None:
    batch = 3
    full = _fit(tmp_path / "full", max_steps=10)
    assert len(full) == 10 * batch and full[:9] != full[9:18]  # epochs are reshuffled
    interrupted = _fit(tmp_path / "run", max_steps=7, num_workers=num_workers)  # stops after the step-6 checkpoint
    assert interrupted == full[: 7 * batch]
    checkpoint = next((tmp_path / "run").glob(f"*step={resume_step}.ckpt"))
    state = torch.load(checkpoint, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (state["epoch"], state["position"]) == position  # batches handed out == steps taken: no prefetch
    resumed = _fit(tmp_path / "resumed", max_steps=10, num_workers=num_workers, ckpt_path=checkpoint)
    assert interrupted[: resume_step * batch] + resumed == full


def test_batches_carry_the_raw_question(tmp_path):
    rows = [
        {"id": "q", "question": "<image1>What is shown?", "answer": "A", "choices": ["cat", "dog"], "images": []},
        {
            "id": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Add 2 and 3."}]}],
            "answer": "5",
        },
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    dm = RLDataModule(train=Files(str(path)), batch_size=2, prompt_template="{question} Think.", shuffle=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.questions == ["What is shown?", "Add 2 and 3."]
    assert batch.select([1]).questions == ["Add 2 and 3."]
