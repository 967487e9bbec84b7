"""The needle-template registry keeps training and evaluation apart (yarnkit/needles.py).
Run: python -m pytest tests/test_needles.py -q
"""

import pytest

from yarnkit import needles


def test_every_training_template_passes_and_every_evaluation_template_collides():
    for template in needles.train_templates() + list(needles.TRAIN_CHAINS):
        assert template.split == "train"
        needles.check_train_template(template)
    needles.check_attributes(needles.TRAIN_ATTRIBUTES)
    for template in needles.eval_templates():
        assert template.split == "eval" and template.markers
        as_training = type(template)(**{**template.__dict__, "split": "train"})
        with pytest.raises(needles.TemplateCollision, match=f"evaluation template '{template.name}'"):
            needles.check_train_template(as_training)


@pytest.mark.parametrize("text, evaluation", [
    ("The special magic number of {key} is {value}. | What is it for {key}? | It is", "magic"),
    ("{key} got {value}. | Which magic numbers did {key} get? | They were", "magic"),  # plural of a marker
    ("{key}: {value} | What is the archive reference of {key}? | The archive reference of {key} is", "archive"),
    ("Remember this: {key} holds {value}. | What does {key} hold? | {key} holds", "archive"),
    ("The pass-key of {key} is {value}. | Pass-key of {key}? | It is", "passkey"),
])
def test_a_recipe_template_that_collides_is_refused_with_both_names(text, evaluation):
    with pytest.raises(needles.TemplateCollision, match=f"'{evaluation}'.*rephrase it"):
        needles.check_train_template(needles.parse_template(text))


def test_attribute_nouns_and_malformed_templates():
    with pytest.raises(needles.TemplateCollision, match="magic number"):
        needles.check_attributes(["Magic Numbers"])
    needles.check_attributes(["locker code"])
    needles.check_train_template(needles.parse_template("{key} keeps {value}. | What does {key} keep? | It keeps"))
    with pytest.raises(needles.TemplateError, match="FACT \\| QUESTION \\| ANSWER"):
        needles.parse_template("{key} keeps {value}.")


def test_key_vocabularies_share_no_word():
    evaluation = {w.lower() for w in needles.EVAL_ADJECTIVES + needles.EVAL_NOUNS}
    training = " ".join(needles.TRAIN_FIRST + needles.TRAIN_LAST + needles.TRAIN_PLACES + needles.TRAIN_THINGS +
                        needles.TRAIN_CODENAMES + needles.TRAIN_ATTRIBUTES).lower().split()
    assert not evaluation & set(training)


def test_restating_answers_name_key_and_attribute_and_an_evaluation_answer_among_them_is_refused(monkeypatch):
    assert all("{key}" in a and "{attr}" in a for a in needles.TRAIN_RESTATED)
    assert all("{keys}" in a and "{attr}" in a for a in needles.TRAIN_RESTATED_ALL)
    names = {t.name for t in needles.train_templates()}
    assert {f"train-restated-{r}" for r in range(len(needles.TRAIN_RESTATED))} <= names  # checked by check_registry
    needles.check_registry()
    added = len(needles.TRAIN_RESTATED)
    monkeypatch.setattr(needles, "TRAIN_RESTATED", needles.TRAIN_RESTATED + ("The archive reference of {key} is",))
    with pytest.raises(needles.TemplateCollision, match=f"'train-restated-{added}'.*'archive'"):
        needles.check_registry()
    monkeypatch.setattr(needles, "TRAIN_RESTATED_ALL", ("The special magic numbers for {keys} are",))
    monkeypatch.setattr(needles, "TRAIN_RESTATED", needles.TRAIN_RESTATED[:-1])
    with pytest.raises(needles.TemplateCollision, match="'train-restated-all-0'.*'magic'"):
        needles.check_registry()
