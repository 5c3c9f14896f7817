"""Prompt files that cannot be trained on are refused when loaded, naming the file, line or row, and the fix."""

import json

import pytest

from trl_visual.data import PromptSetError, check_prompts, load_prompts


def test_json_file_may_hold_a_list_or_json_lines(tmp_path):
    rows = [{"prompt": "a cat", "tag": 1}, {"prompt": "a dog", "tag": 2}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    assert load_prompts(str(tmp_path / "list.json"))["prompt"] == ["a cat", "a dog"]
    assert load_prompts(str(tmp_path / "lines.json"))["tag"] == [1, 2]


def test_a_json_line_that_is_not_an_object_is_named(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n\n["a dog"]\n')
    with pytest.raises(PromptSetError, match=r"p.jsonl', line 3: a JSON list, not an object"):
        load_prompts(str(tmp_path / "p.jsonl"))


def test_blank_and_non_string_prompts_name_at_most_three_rows(tmp_path):
    rows = [{"prompt": "a cat"}, {"prompt": "   "}, {"prompt": {"x": 1}}, {"prompt": None}, {"prompt": None}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises(PromptSetError) as error:
        load_prompts(str(tmp_path / "p.jsonl"))
    message = str(error.value)
    assert "row 1: an empty string" in message and "row 2: {'x': 1} (dict)" in message
    assert "row 3: None" in message and "row 4" not in message and "row 0" not in message


def test_a_file_that_datasets_cannot_parse_names_the_file_and_the_cause(tmp_path):
    (tmp_path / "p.csv").write_text("prompt\na cat\na dog,extra,fields\n")
    with pytest.raises(PromptSetError, match=r"Cannot read prompts from '.*p.csv': .*fields"):
        load_prompts(str(tmp_path / "p.csv"))


def test_missing_local_paths_are_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("./prompts", "prompts.parquet", "~/no_such_prompts_xyz.jsonl"):
        with pytest.raises(FileNotFoundError, match="No prompt file"):
            load_prompts(name)


def test_check_prompts_accepts_clean_prompts_and_refuses_an_empty_set():
    from datasets import Dataset

    check_prompts(Dataset.from_dict({"prompt": ["a cat", "a dog"]}), "prompt", "mine")
    with pytest.raises(PromptSetError, match="'mine' has no rows"):
        check_prompts(Dataset.from_dict({"prompt": []}), "prompt", "mine")
    assert issubclass(PromptSetError, ValueError)
