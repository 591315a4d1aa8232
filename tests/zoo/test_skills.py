"""The zoo's skills and task files: committed files are the generator's output, tasks load and score an
oracle perfectly, the tokenizer round-trips every text, and no training stream shows an evaluated item."""

import itertools
from pathlib import Path

import pytest
import yaml

from evomerge.fitness.evaluate import evaluate
from evomerge.fitness.task import load_task
from evomerge.zoo import skills
from evomerge.zoo.train import BOS_ID, build_tokenizer, encode_batch
from tests.fitness.fakes import FakeBackend

COMMITTED = Path(__file__).parents[2] / "fitness" / "zoo"


def test_committed_task_files_are_the_generators_output():
    files = skills.task_files()
    assert files == skills.task_files()  # deterministic
    on_disk = {
        p.relative_to(COMMITTED).as_posix(): p.read_bytes() for p in COMMITTED.rglob("*") if p.is_file()
    }
    on_disk.pop("README.md", None)
    assert on_disk == files, "fitness/zoo is stale: run `python -m evomerge.zoo.skills fitness/zoo`"


@pytest.mark.parametrize("name", list(skills.SKILLS))
def test_task_yaml_is_the_config_and_loads_with_disjoint_splits(name):
    skill = skills.SKILLS[name]
    assert yaml.safe_load(skills.task_yaml(skill)) == skills.task_config(skill)
    task = load_task(COMMITTED / f"{name}.yaml")
    search, heldout = task.items("search"), task.items("heldout")
    assert len(search) == skills.SEARCH_SIZE and len(heldout) == skills.HELDOUT_SIZE
    assert not {i.id for i in search} & {i.id for i in heldout}
    prompts = [skill.prompt(dict(i.fields)) for i in (*search, *heldout)]
    assert len(set(prompts)) == len(prompts)


@pytest.mark.parametrize("name", list(skills.SKILLS))
def test_an_oracle_scores_one_and_a_wrong_answer_zero(name):
    task = load_task(COMMITTED / f"{name}.yaml")
    items = (*task.items("search"), *task.items("heldout"))
    answers = {skills.SKILLS[name].prompt(dict(i.fields)): str(i.fields["answer"]) for i in items}
    for split in ("search", "heldout"):
        assert (
            evaluate(task, split, FakeBackend(answers={p: a + "\n9" for p, a in answers.items()})).metrics[
                "mean"
            ]
            == 1.0
        )
        assert evaluate(task, split, FakeBackend(answers={p: "x" + a for p, a in answers.items()})).metrics[
            "mean"
        ] == (1.0 if name == "add" else 0.0)  # 'last_number' finds the number after the junk


def _mixtures():
    from evomerge.zoo.build import zoo_config

    config = zoo_config(quick=True)
    return {"base": config.base_mixture, **{name: config.expert_mixture(name) for name in skills.SKILLS}}


@pytest.mark.parametrize("stage", list(_mixtures()))
def test_training_streams_never_show_an_evaluated_item(stage):
    evaluated = skills.evaluated_prompts()
    assert len(evaluated) == len(skills.SKILLS) * (skills.SEARCH_SIZE + skills.HELDOUT_SIZE)
    for seed in (0, 1):
        stream = skills.training_stream(_mixtures()[stage], seed, stage, exclude=evaluated)
        drawn = {prompt for prompt, _ in itertools.islice(stream, 20_000)}
        assert not drawn & evaluated


def test_the_base_corpus_is_disjoint_from_the_scored_slices():
    """PRETRAIN items are never items of a skill, even outside the evaluated ones: the base cannot
    know any scored item, and replay cannot teach an expert another expert's skill."""
    drawn = {}
    for name in [*skills.SKILLS, *skills.PRETRAIN]:
        stream = skills.training_stream({name: 1.0}, 0, "disjoint", exclude=set())
        drawn[name] = {prompt for prompt, _ in itertools.islice(stream, 5000)}
    skill_prompts = set().union(*(drawn[name] for name in skills.SKILLS))
    pretrain_prompts = set().union(*(drawn[name] for name in skills.PRETRAIN))
    assert not skill_prompts & pretrain_prompts
    new_words = {w for p in drawn["lexicon"] for w in p[3:-1].split()}
    known_words = {w for p in drawn["lexicon-known"] for w in p[3:-1].split()}
    assert not new_words & known_words and new_words | known_words == set(skills.LEXICON)


def test_training_streams_are_seeded():
    mix = {"add": 1.0, "lexicon": 2.0}
    first = list(itertools.islice(skills.training_stream(mix, 0, "s"), 50))
    assert first == list(itertools.islice(skills.training_stream(mix, 0, "s"), 50))
    assert first != list(itertools.islice(skills.training_stream(mix, 1, "s"), 50))
    assert first != list(itertools.islice(skills.training_stream(mix, 0, "t"), 50))
    with pytest.raises(ValueError, match="unknown: nope"):
        next(skills.training_stream({"nope": 1.0}, 0, "s"))


def test_tokenizer_round_trips_every_text_one_token_per_character():
    tok = build_tokenizer()
    texts = [skills.task_yaml(s) for s in skills.SKILLS.values()]
    for name in skills.SKILLS:
        texts += [p + a for p, a in itertools.islice(skills.training_stream({name: 1.0}, 0, "tok"), 200)]
    for text in texts:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        assert ids[0] == BOS_ID and len(ids) == len(text) + 1
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.unk_token_id not in tok("12+7= rev abc\n", add_special_tokens=False)["input_ids"]


def test_training_batches_score_only_the_answer_and_eos():
    tok = build_tokenizer()
    batch = encode_batch(tok, [("12+7=", "19"), ("rev abcd=", "dcba")])
    labels, ids = batch["labels"], batch["input_ids"]
    scored = [tok.decode(ids[r][labels[r] != -100].tolist()) for r in range(2)]
    assert scored == ["19</s>", "dcba</s>"]
    assert batch["attention_mask"].sum(1).tolist() == [1 + 5 + 2 + 1, 1 + 9 + 4 + 1]
    real = ids[0][batch["attention_mask"][0].bool()].tolist()
    assert real[0] == BOS_ID and tok.decode(real, skip_special_tokens=True) == "12+7=19"
