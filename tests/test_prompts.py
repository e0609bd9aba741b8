import pytest

from benchmark.concepts import ConceptError, load_concept_file, resolve_concept
from benchmark.prompts import PromptSetError, derived_seed, file_sha256, load_prompt_set


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_columns_are_mapped_by_name(tmp_path):
    path = write(tmp_path / "p.csv", "evaluation_guidance,Prompt,case_number,evaluation_seed,artist\n"
                                     "7.5,a church,10,42,none\n5,a tench,11,43,x\n")
    prompts = load_prompt_set(path)
    assert [r.prompt for r in prompts.records] == ["a church", "a tench"]
    assert [r.id for r in prompts.records] == ["10", "11"]
    assert [r.seed for r in prompts.records] == [42, 43]
    assert [r.guidance for r in prompts.records] == [7.5, 5.0]
    assert prompts.records[0].extra == {"artist": "none"}


def test_missing_prompt_column_is_named(tmp_path):
    path = write(tmp_path / "p.csv", "case_number,text\n0,a church\n")
    with pytest.raises(PromptSetError, match="no 'prompt' column.*case_number, text"):
        load_prompt_set(path)


@pytest.mark.parametrize("text", ["", "prompt,evaluation_seed\n"])
def test_empty_prompt_set_is_an_error(tmp_path, text):
    with pytest.raises(PromptSetError, match="empty|no prompts"):
        load_prompt_set(write(tmp_path / "p.csv", text))


@pytest.mark.parametrize("row, fragment", [
    ("a church,abc", "not a number"),
    ("a church,1.5", "not an integer"),
    ("a church,nan", "non-finite"),
    (",5", "prompt is empty"),
])
def test_bad_rows_are_named(tmp_path, row, fragment):
    path = write(tmp_path / "p.csv", f"prompt,evaluation_seed\n{row}\n")
    with pytest.raises(PromptSetError, match=fragment):
        load_prompt_set(path)


def test_duplicate_case_numbers_rejected(tmp_path):
    path = write(tmp_path / "p.csv", "case_number,prompt\n1,a\n1,b\n")
    with pytest.raises(PromptSetError, match="appears twice"):
        load_prompt_set(path)


def test_hash_mismatch_rejected(tmp_path):
    path = write(tmp_path / "p.csv", "prompt\na church\n")
    assert load_prompt_set(path, expected_sha256=file_sha256(path))
    with pytest.raises(PromptSetError, match="sha256"):
        load_prompt_set(path, expected_sha256="0" * 64)


def test_derived_seeds_follow_prompt_id(tmp_path):
    first = write(tmp_path / "a.csv", "case_number,prompt\n1,a\n2,b\n")
    second = write(tmp_path / "b.csv", "case_number,prompt\n2,b\n1,a\n")
    seeds_first = {r.id: r.seed for r in load_prompt_set(first, prompt_set_id="set").records}
    seeds_second = {r.id: r.seed for r in load_prompt_set(second, prompt_set_id="set").records}
    assert seeds_first == seeds_second
    assert seeds_first["1"] == derived_seed(0, "set", "1")
    assert derived_seed(1, "set", "1") != derived_seed(0, "set", "1")


def test_shipped_concepts_load():
    for name in ("circle", "striped"):
        concept = resolve_concept(name)
        prompts = concept.load_prompts()
        assert len(prompts) == 50
        assert concept.load_retain() is not None


def test_concept_added_by_file_alone(tmp_path):
    prompts = write(tmp_path / "squares.csv", "case_number,prompt,evaluation_seed,evaluation_guidance\n"
                                              "0,a red square,1,5\n1,a blue square,2,5\n")
    concept_file = write(tmp_path / "square.yaml", (
        "name: square\nkind: object\nerase_phrase: square\nmodel: world\n"
        f"prompts: {{file: squares.csv, sha256: {file_sha256(prompts)}}}\n"
        "evaluator: {name: world-classifier, settings: {attribute: shape, target: square}}\n"
    ))
    concept = resolve_concept(str(concept_file))
    assert concept.name == "square"
    assert [r.prompt for r in concept.load_prompts().records] == ["a red square", "a blue square"]
    assert concept.evaluator_settings == {"attribute": "shape", "target": "square"}


def test_concept_file_errors(tmp_path):
    with pytest.raises(ConceptError, match="missing required key 'erase_phrase'"):
        load_concept_file(write(tmp_path / "a.yaml", "name: a\nprompts: x.csv\nevaluator: e\n"))
    with pytest.raises(ConceptError, match="unknown keys colour"):
        load_concept_file(write(tmp_path / "b.yaml", "name: a\ncolour: red\n"))
    with pytest.raises(ConceptError, match="file not found"):
        load_concept_file(write(tmp_path / "c.yaml", "name: a\nerase_phrase: a\nprompts: x.csv\nevaluator: e\n"))
