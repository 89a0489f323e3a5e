"""world.py: the synthetic world (reproducible, boxes on the shapes, disjoint splits, several tasks per
scene), its scoring and the text-only baseline."""
import json
from collections import Counter

import numpy as np
import pytest

import data as D
import world as W
from tiling import canvas_to_photo


def test_synthetic_reproducible_boxes_on_objects_and_split_disjoint():
    a = [W.synthetic_sample(11, "train", i, 128) for i in range(60)]
    b = [W.synthetic_sample(11, "train", i, 128) for i in range(60)]
    assert [s.turns for s in a] == [s.turns for s in b]
    assert all(x.image is None and y.image is None or (np.asarray(x.image) == np.asarray(y.image)).all() for x, y in zip(a, b))
    tasks = Counter(s.task for s in a)
    assert set(tasks) == set(W.TASKS)
    for s in a:
        for o in s.truth.get("objects", []):
            x0, y0, x1, y1 = o["box"]
            px = np.asarray(s.image, np.int32)
            cx, cy = (x0 + x1) // 2, (y0 + y1 - 1) // 2 + (y1 - y0) // 4 if o["shape"] == "triangle" else (y0 + y1) // 2
            assert np.abs(px[cy, cx] - np.array(W.COLORS[o["color"]])).max() < 3     # the box's centre is the shape
        if s.task == "grounding":
            (box,) = W.parse_boxes(s.turns[0][1])
            o = next(o for o in s.truth["objects"] if f"the {o['color']} {o['shape']}" in s.turns[0][0])
            back = canvas_to_photo(box, s.image.size, 128)
            assert max(abs(u - v) for u, v in zip(back, o["box"])) <= 0.005 * 128 * max(s.image.size) / 128 + 1
    train_keys = {json.dumps(s.turns) + str(s.truth) for s in (W.synthetic_sample(11, "train", i, 128) for i in range(1500))}
    eval_keys = {json.dumps(s.turns) + str(s.truth) for s in W.eval_samples(11, 300, 128)}
    assert not train_keys & eval_keys


def test_scoring_helpers():
    assert W.parse_boxes("a [0.1, 0.2, 0.3, 0.4] b [0.5, 0.6]") == [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6]]
    assert W.box_iou([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0 and W.box_iou([0, 0, 1, 1], [0.5, 0, 1.5, 1]) == pytest.approx(1 / 3)
    ref = "red circle [0.10, 0.10, 0.50, 0.50], blue square [0.60, 0.60, 0.90, 0.90]"
    assert W.score("detection", "red circle [0.12, 0.11, 0.5, 0.52], blue square [0.6, 0.6, 0.9, 0.9]", ref) == 1.0
    assert W.score("detection", "red circle [0.12, 0.11, 0.5, 0.52]", ref) == 0.0
    assert W.score("detection", "green circle [0.12, 0.11, 0.5, 0.52], blue square [0.6, 0.6, 0.9, 0.9]", ref) == 0.0
    assert W.score("grounding", "[0.40, 0.40, 0.80, 0.80]", "[0.1, 0.1, 0.5, 0.5]") == 0.0
    assert W.score("vqa", " red. ", "Red.") == 1.0 and W.score("vqa", "Blue.", "Red.") == 0.0


def test_text_only_baseline_answers_each_question_with_its_most_common_training_answer():
    def s(task, q, a):
        return D.Sample([(q, a)], task=task, source="t")
    color, count, where = "What color is the square?", "How many shapes are there?", "Where is the red circle?"
    train = ([s("vqa", color, "Red.")] * 3 + [s("vqa", color, "Blue.")] * 2 + [s("vqa", count, "2.")]
             + [s("grounding", where, "[0.10, 0.10, 0.50, 0.50]")] * 2 + [s("grounding", where, "[0.60, 0.60, 0.90, 0.90]")])
    held_out = [s("vqa", color, "Red."), s("vqa", color, "Blue."),
                s("vqa", "What shape is the red object?", "Red."),          # unseen: the task's most common answer
                s("grounding", where, "[0.12, 0.10, 0.50, 0.52]"),          # scored by IoU like the model
                s("caption", "Describe the image briefly.", "A red circle.")]  # no training answer at all
    got = W.text_only_baseline(train, held_out)
    assert got["vqa"] == (2.0, 3) and got["grounding"] == (1.0, 1) and got["caption"] == (0.0, 1)
    assert got["som"] == (0.0, 0)


def test_tasks_per_image_continues_the_same_scene_and_held_out_keeps_one_task():
    for i in range(40):
        one = W.synthetic_sample(5, "train", i, 128)
        many = W.synthetic_sample(5, "train", i, 128, tasks_per_image=3)
        assert many.turns[:len(one.turns)] == one.turns and many.task == one.task   # same scene, same first task
        tasks = many.truth["turn_tasks"]
        assert len(tasks) == len(many.turns)
        groups = [t for k, t in enumerate(tasks) if k == 0 or tasks[k - 1] != t]
        assert len(groups) == len(set(groups)) <= 3                                  # different tasks
        if one.image is not None:
            assert (np.asarray(one.image) == np.asarray(many.image)).all()
        else:
            assert many.turns == one.turns
    assert any(len(set(W.synthetic_sample(5, "train", i, 128, 3).truth["turn_tasks"])) > 1 for i in range(40))
    held = W.eval_per_task(5, 3, 128)
    assert Counter(s.task for s in held) == {t: 3 for t in W.TASKS}
    assert all(set(s.truth.get("turn_tasks", [s.task])) == {s.task} for s in held)


def test_text_only_baseline_counts_each_turn_under_its_own_task():
    multi = D.Sample([("Describe the image briefly.", "A red circle."), ("How many shapes are there?", "1.")],
                     task="caption", truth={"turn_tasks": ["caption", "vqa"]})
    held_out = [D.Sample([("How many apples?", "1.")], task="vqa")]      # unseen question: the task's answer
    assert W.text_only_baseline([multi], held_out)["vqa"] == (1.0, 1)


def test_scene_text_is_the_detection_answer_plus_the_word():
    s = next(x for x in (W.synthetic_sample(0, "train", i, 128) for i in range(300))
             if x.task == "detection" and x.truth["word"])
    text = W.scene_text(s.truth["objects"], s.truth["word"], s.image.size, 128)
    assert text.startswith(s.turns[0][1] + ", the word " + s.truth["word"]["text"] + " [")
    assert W.scene_text([], None, (10, 10), 128) == "an empty background"


def test_the_synthetic_dataset_needs_its_generator():
    with pytest.raises(D.DataError, match='names the "synthetic" dataset but no generator'):
        D.SampleSource([{"path": "synthetic", "ratio": 1}], 0, 128)
    src = D.SampleSource([{"path": "synthetic", "ratio": 1}], 3, 128, synthetic=W.synthetic_sample)
    assert [src.next().turns for _ in range(3)] == [W.synthetic_sample(3, "train", i, 128).turns for i in range(3)]
