"""FID reference image sets: concept entries, world renders, image folders, and FID in a world run."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark.cli import main
from benchmark.concepts import ConceptError, load_concept_file, resolve_concept
from benchmark.fid_reference import (
    FIDReference, ReferenceSet, load_reference_set, reference_features, render_world_retain,
)
from benchmark.paths import DATA_DIR
from benchmark.prompts import PromptRecord, file_sha256

RETAIN_CSV = DATA_DIR / "prompts" / "world_retain.csv"
CIRCLE_CSV = DATA_DIR / "prompts" / "world_circle.csv"


def retain_records(count: int = 4) -> list[PromptRecord]:
    return resolve_concept("circle").load_retain().records[:count]


def write_concept(folder: Path, fid_reference: str, retain_rows: int = 6) -> Path:
    """Write a world concept whose retain set is the first ``retain_rows`` world retain prompts."""
    lines = RETAIN_CSV.read_text().splitlines()
    (folder / "retain.csv").write_text("\n".join(lines[: retain_rows + 1]) + "\n")
    path = folder / "concept.yaml"
    path.write_text(
        "name: small-circle\nerase_phrase: circle\nmodel: world\ndefault_guidance: 5.0\n"
        f"prompts: {{file: {CIRCLE_CSV}}}\n"
        "evaluator: {name: world-classifier, settings: {attribute: shape, target: circle}}\n"
        f"retain: {{file: retain.csv}}\nfid_reference: {fid_reference}\n"
    )
    return path


def write_images(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = folder / f"{index:03d}.png"
        Image.fromarray(rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    (folder / "notes.txt").write_text("not an image")
    return paths


# ----------------------------------------------------------------------------------------
# Concept entries


def test_shipped_concepts_name_reference_sets():
    for name in ("circle", "striped"):
        assert resolve_concept(name).fid_reference.render == "world_retain"
    for name in ("church", "garbage_truck", "nudity", "parachute", "tench", "vangogh"):
        assert resolve_concept(name).fid_reference.folder == "$COCO_10K_IMAGES"


@pytest.mark.parametrize("entry, message", [
    ("{render: coco}", "invalid fid_reference render 'coco'; valid: world_retain"),
    ("{folder: ''}", "fid_reference folder must be a non-empty path"),
    ("{render: world_retain, folder: x}", "fid_reference must be"),
    ("images/", "fid_reference must be"),
])
def test_invalid_fid_reference_entries(tmp_path, entry, message):
    with pytest.raises(ConceptError, match=message):
        load_concept_file(write_concept(tmp_path, entry))


# ----------------------------------------------------------------------------------------
# World renders


def test_world_renders_are_deterministic():
    from benchmark.world.render import Scene, render_scene

    records = retain_records()
    first, second = render_world_retain(records), render_world_retain(records)
    images = list(first.iter_images())

    assert first.count == 4
    assert first.sha256 == second.sha256
    assert all(np.array_equal(a, b) for a, b in zip(images, second.iter_images()))
    scene = Scene(records[0].extra["shape"], records[0].extra["color"], records[0].extra["texture"])
    assert np.array_equal(images[0], np.asarray(render_scene(scene, np.random.default_rng(records[0].seed))))
    assert images[0].shape == (32, 32, 3)


def test_world_render_sha256_follows_seed():
    records = retain_records()
    reseeded = [PromptRecord(r.id, r.prompt, r.seed + 1, r.guidance, r.extra) for r in records]
    assert render_world_retain(records).sha256 != render_world_retain(reseeded).sha256


def test_world_render_needs_attributes():
    record = PromptRecord("7", "a square", 1, 5.0, {"shape": "square", "color": "", "texture": "plain"})
    with pytest.raises(ValueError, match="retain prompt 7 .* has no valid color column"):
        render_world_retain([record])


# ----------------------------------------------------------------------------------------
# Image folders


def test_folder_reference_reads_images(tmp_path, monkeypatch):
    paths = write_images(tmp_path / "coco", 3)
    monkeypatch.setenv("FID_TEST_IMAGES", str(tmp_path / "coco"))

    reference = load_reference_set(FIDReference(folder="$FID_TEST_IMAGES"), [])
    expected = hashlib.sha256("".join(f"{p.name}\t{file_sha256(p)}\n" for p in paths).encode()).hexdigest()
    assert reference.count == 3
    assert reference.sha256 == expected
    assert [image.shape for image in reference.iter_images()] == [(24, 24, 3)] * 3


def test_folder_reference_is_relative_to_concept(tmp_path):
    write_images(tmp_path / "images", 2)
    concept = load_concept_file(write_concept(tmp_path, "{folder: images}"))
    assert load_reference_set(concept.fid_reference, []).count == 2


def test_folder_reference_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("FID_UNSET_IMAGES", raising=False)
    with pytest.raises(FileNotFoundError, match="environment variable that is not set"):
        load_reference_set(FIDReference(folder="$FID_UNSET_IMAGES"), [])
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        load_reference_set(FIDReference(folder=str(tmp_path / "missing")), [])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="contains no .png"):
        load_reference_set(FIDReference(folder=str(tmp_path / "empty")), [])


def test_reference_features_are_cached(tmp_path):
    class CountingEvaluator:
        weights_sha256 = "ab" * 32
        calls = 0

        def features(self, images):
            self.calls += 1
            import torch

            return torch.tensor([[float(image.mean())] for image in images], dtype=torch.float64)

    evaluator = CountingEvaluator()
    reference = render_world_retain(retain_records())
    first = reference_features(evaluator, reference, tmp_path)
    second = reference_features(evaluator, reference, tmp_path)

    assert evaluator.calls == 1
    assert np.array_equal(first, second)
    assert len(list(tmp_path.glob("*.npy"))) == 1

    renamed = ReferenceSet("other", reference.count, "cd" * 32, reference.iter_images)
    reference_features(evaluator, renamed, tmp_path)
    assert evaluator.calls == 2


# ----------------------------------------------------------------------------------------
# FID in a run on the default world


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    from inception_layout import random_inception, save_state_dict

    return save_state_dict(random_inception(seed=0), tmp_path_factory.mktemp("inception") / "inception-random.safetensors")


def run_world(tmp_path, capsys, concept: Path, *settings: str) -> dict:
    code = main(["run", "--concept", str(concept), "--model", "world", "--no-progress", "--output", str(tmp_path),
                 "--set", "run.max_prompts=1", *[value for setting in settings for value in ("--set", setting)]])
    assert code == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    return json.loads((run_dir / "summary.json").read_text())["utility"]


def test_world_run_measures_fid(tmp_path, capsys, inception_file):
    concept = write_concept(tmp_path, "{render: world_retain}")
    utility = run_world(tmp_path / "runs", capsys, concept,
                        f"evaluator/fid.feature_extractor_weights_path={inception_file}",
                        "evaluator/fid.min_images=6")
    fid = utility["fid"]
    records = load_concept_file(concept).load_retain().records

    assert fid["status"] == "measured", fid.get("reason")
    assert fid["fid"] >= 0
    assert fid["kid_mean"] is not None
    assert fid["n_prompts"] == 6
    assert fid["n_generated"] == 6 - fid["n_invalid"]
    assert fid["n_reference"] == 6
    assert fid["reference_sha256"] == render_world_retain(records).sha256
    assert fid["weights_sha256"] == file_sha256(inception_file)


def test_world_run_reports_missing_folder(tmp_path, capsys, caplog, inception_file, monkeypatch):
    monkeypatch.delenv("FID_UNSET_IMAGES", raising=False)
    concept = write_concept(tmp_path, "{folder: $FID_UNSET_IMAGES}")
    utility = run_world(tmp_path / "runs", capsys, concept,
                        f"evaluator/fid.feature_extractor_weights_path={inception_file}")

    assert utility["fid"]["status"] == "unavailable"
    assert "$FID_UNSET_IMAGES" in utility["fid"]["reason"]
    assert "environment variable that is not set" in utility["fid"]["reason"]
    assert "utility metric fid is unavailable" in caplog.text


def test_fid_settings_come_from_section(tmp_path):
    from benchmark.config import ConfigError
    from benchmark.runner import Runner, RunRequest, resolve

    concept = str(write_concept(tmp_path, "{render: world_retain}"))
    runner = Runner(resolve(RunRequest(concept=concept, sets=["evaluator/fid.min_images=7", "evaluator/fid.batch_size=3"])))
    assert runner._utility_settings("fid") == {"min_images": 7, "batch_size": 3}
    assert runner._utility_settings("clip-score") == {}

    invalid = Runner(resolve(RunRequest(concept=concept, sets=["evaluator/fid.min_imagez=7"])))
    with pytest.raises(ConfigError, match="min_imagez"):
        invalid._optional_metric("fid", lambda evaluator: {})
    with pytest.raises(ConfigError, match="min_imagez"):
        invalid.check_utility_settings()


def test_invalid_fid_setting_fails_before_prompts(tmp_path):
    from benchmark.config import ConfigError
    from benchmark.runner import Runner, RunRequest, resolve

    request = RunRequest(model="tiny-random", sets=["evaluator/fid.min_imagez=7"], output=tmp_path)
    with pytest.raises(ConfigError, match="min_imagez"):
        Runner(resolve(request)).run()
    assert not any(tmp_path.iterdir())
