"""The built-in synthetic world: photos of coloured shapes and words in varied aspect ratios (so skip
tokens occur), a conversation per scene for each of the paper's task families (caption, VQA, referring
grounding, detection, text spotting, Set-of-Marks, language-only), and its evaluation: scoring, the
text-only baseline and the held-out samples. Deterministic from (seed, split, index); a scene goes to
the eval split iff a hash of its content says so, so the splits never overlap. data.py reads it as
the dataset path "synthetic" (SampleSource's `synthetic` generator)."""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter

from PIL import Image, ImageDraw, ImageFont

from data import REC_PROMPT, Sample, SampleSource
from tiling import format_box, labelled_boxes, photo_to_canvas


# ----------------------------------------------------------------------------- scenes and tasks

COLORS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 230), "yellow": (230, 200, 20),
          "purple": (140, 50, 180), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle")
WORDS = ("CAT", "DOG", "SUN", "MAP", "BOX", "KEY", "CUP", "HAT")
ASPECTS = ((1, 1), (4, 3), (3, 4), (2, 1), (1, 2), (3, 1), (1, 3))
TASKS = ("caption", "vqa", "grounding", "detection", "ocr", "som", "language")
NAMES = ("Tom", "Ann", "Bob", "Eve", "Sam", "Mia")
DIALOG = (("Hello!", "Hello! How can I help you today?"), ("Thank you.", "You are welcome."),
          ("Who are you?", "I am an AI assistant that can see images."), ("Goodbye.", "Goodbye! Have a nice day."))


def _draw_scene(rng: random.Random, long_side: int = 192):
    aw, ah = rng.choice(ASPECTS)
    w, h = (long_side, long_side * ah // aw) if aw >= ah else (long_side * aw // ah, long_side)
    bg = tuple(rng.randint(200, 250) for _ in range(3))
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    taken, objects = [], []

    def place(bw, bh):
        for _ in range(200):
            x, y = rng.randint(0, w - bw), rng.randint(0, h - bh)
            box = (x, y, x + bw, y + bh)
            if all(box[2] + 2 <= t[0] or t[2] + 2 <= box[0] or box[3] + 2 <= t[1] or t[3] + 2 <= box[1] for t in taken):
                taken.append(box)
                return box
        return None

    word = None
    if rng.random() < 0.5:
        text = rng.choice(WORDS)
        font = ImageFont.load_default(size=max(12, int(0.3 * min(w, h))))
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        box = place(r - l, b - t)
        if box:
            draw.text((box[0] - l, box[1] - t), text, fill=(10, 10, 10), font=font)
            word = {"text": text, "box": box}
    for color in rng.sample(list(COLORS), rng.randint(1, 3)):
        size = int(rng.uniform(0.3, 0.45) * min(w, h))
        shape = rng.choice(SHAPES)
        box = place(size, size)
        if box is None:
            continue
        x0, y0, x1, y1 = box
        if shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=COLORS[color])
        elif shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=COLORS[color])
        else:
            draw.polygon([(x0, y1 - 1), ((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1)], fill=COLORS[color])
        objects.append({"color": color, "shape": shape, "box": box})
    objects.sort(key=lambda o: (o["box"][0] + o["box"][2]))          # left to right
    return img, objects, word


def _phrase_list(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def scene_text(objects, word, photo_size, canvas) -> str:
    """The scene written out in the detection answer's words and boxes, the word (if any) last:
    what the LLM base reads in place of the picture (pretrain.py)."""
    box = lambda b: format_box(photo_to_canvas(b, photo_size, canvas))
    parts = [f"{o['color']} {o['shape']} {box(o['box'])}" for o in objects]
    return ", ".join(parts + ([f"the word {word['text']} {box(word['box'])}"] if word else [])) or "an empty background"


def _tasks_for(rng, img, objects, word, canvas, exclude=()):
    """(task, turns) for one scene: a task drawn at random from those the scene allows (grounding,
    detection and Set-of-Marks need an object, OCR a word), less `exclude`; (None, []) if none is left."""
    box = lambda b: format_box(photo_to_canvas(b, img.size, canvas))
    center = lambda b: format_box(photo_to_canvas([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2], img.size, canvas))
    name = lambda o: f"{o['color']} {o['shape']}"
    choices = ["caption", "vqa"] + (["grounding", "detection", "som"] if objects else []) + (["ocr"] if word else [])
    choices = [c for c in choices if c not in exclude]
    if not choices:
        return None, []
    task = rng.choice(choices)
    if task == "caption":
        parts = [("an " if o["color"][0] in "aeiou" else "a ") + name(o) for o in objects] + ([f"the word {word['text']}"] if word else [])
        ans = (_phrase_list(parts) if parts else "nothing but an empty background") + "."
        return task, [("Describe the image briefly.", ans[0].upper() + ans[1:])]
    if task == "vqa":
        qa = [("How many shapes are there?", f"{len(objects)}.")]
        shapes = [o["shape"] for o in objects]
        for o in objects:
            if shapes.count(o["shape"]) == 1:
                qa.append((f"What color is the {o['shape']}?", o["color"].capitalize() + "."))
            qa.append((f"What shape is the {o['color']} object?", o["shape"].capitalize() + "."))
        for a in objects:
            for b in objects:
                ca, cb = (a["box"][0] + a["box"][2]) / 2, (b["box"][0] + b["box"][2]) / 2
                if ca + 0.1 * img.width < cb:
                    qa.append((f"Is the {name(a)} to the left or to the right of the {name(b)}?", "Left."))
                    qa.append((f"Is the {name(b)} to the left or to the right of the {name(a)}?", "Right."))
        return task, rng.sample(qa, min(3, len(qa)))
    if task == "grounding":
        o = rng.choice(objects)
        return task, [(REC_PROMPT.format(f"the {name(o)}"), box(o["box"]))]
    if task == "detection":
        return task, [("Detect all the objects in the image.", scene_text(objects, None, img.size, canvas))]
    if task == "ocr":
        return task, [("What text is written in the image? Answer with the text and its box.",
                       f"{word['text']} {box(word['box'])}")]
    marks = rng.sample(objects, len(objects))
    q = " ".join(f"<Mark {i + 1}> {center(o['box'])}" for i, o in enumerate(marks)) + " What is at each mark?"
    return "som", [(q, " ".join(f"<Mark {i + 1}>: {name(o)}." for i, o in enumerate(marks)))]


def _language_turns(rng):
    kind = rng.randrange(3)
    if kind == 0:
        turns = []
        for _ in range(rng.randint(1, 2)):
            a, b = rng.randint(0, 49), rng.randint(0, 49)
            a, b = max(a, b), min(a, b)
            op = rng.choice("+-")
            turns.append((f"What is {a} {op} {b}?", f"{a + b if op == '+' else a - b}."))
        return turns
    if kind == 1:
        who, a, b = rng.choice(NAMES), rng.randint(1, 20), rng.randint(1, 20)
        return [(f"{who} has {a} apples and gets {b} more. How many apples does {who} have now?", f"{a + b}.")]
    return rng.sample(DIALOG, rng.randint(1, 2))


def synthetic_sample(seed: int, split: str, index: int, canvas: int, tasks_per_image: int = 1) -> Sample:
    """Sample `index` of a split. tasks_per_image > 1: a scene's conversation continues with up to that
    many different tasks about the same picture (more supervision per encoded image, as multi-turn
    conversations in the paper's data); held-out samples keep one task, so the scored answer never
    follows another task's answer about the same scene."""
    for attempt in range(1000):
        rng = random.Random(f"{seed}:{split}:{index}:{attempt}")
        if rng.random() < 1 / len(TASKS):
            img, task, turns, truth = None, "language", _language_turns(rng), {}
            key = json.dumps(turns)
        else:
            img, objects, word = _draw_scene(rng)
            task, turns = _tasks_for(rng, img, objects, word, canvas)
            truth = {"objects": objects, "word": word}
            key = json.dumps([img.size, objects, word, task, turns])
        if (int(hashlib.sha256(key.encode()).hexdigest(), 16) % 10 == 0) == (split == "eval"):
            truth["turn_tasks"] = [task] * len(turns)
            if img is not None and tasks_per_image > 1:
                # Drawn after the split is decided: a scene's split depends on its first task only.
                more = random.Random(f"{seed}:{split}:{index}:more")
                for _ in range(more.randint(1, tasks_per_image) - 1):
                    t, extra = _tasks_for(more, img, objects, word, canvas, exclude=truth["turn_tasks"])
                    turns = turns + extra
                    truth["turn_tasks"] += [t] * len(extra)
            return Sample(turns, task=task, source=f"synthetic:{split}:{index}", image=img,
                          image_size=img.size if img else None, truth=truth)
    raise RuntimeError("unreachable: a tenth of all scenes are eval scenes")


# ----------------------------------------------------------------------------- evaluation

def parse_boxes(text: str) -> list[list[float]]:
    return [vals for _, vals in labelled_boxes(text)]


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def score(task: str, generated: str, reference: str) -> float:
    """1.0 if the answer is right. Box tasks: every reference (phrase, box) must be matched by a
    generated one with the same phrase and IoU >= 0.5, and nothing extra; other tasks: exact match."""
    gen, ref = generated.strip(), reference.strip()
    if task in ("grounding", "detection", "ocr"):
        g, r = ([(p.lower(), v) for p, v in labelled_boxes(t) if len(v) == 4] for t in (gen, ref))
        if len(g) != len(r):
            return 0.0
        left = list(g)
        for phrase, box in r:
            hit = next((x for x in left if x[0] == phrase and box_iou(x[1], box) >= 0.5), None)
            if hit is None:
                return 0.0
            left.remove(hit)
        return 1.0
    return float(gen.lower() == ref.lower())


def text_only_baseline(train: list[Sample], held_out: list[Sample]) -> dict[str, tuple[float, int]]:
    """Per task (right, n) when every held-out question gets the answer most often given to the same
    question in `train` (a question never seen gets its task's most common answer). This is what
    answering without looking at the image scores: the floor a model must beat to show it sees."""
    by_question, by_task = {}, {}
    for s in train:
        for (q, a), task in zip(s.turns, s.truth.get("turn_tasks") or [s.task] * len(s.turns)):
            by_question.setdefault(q, Counter())[a] += 1
            by_task.setdefault(task, Counter())[a] += 1
    out = {t: [0.0, 0] for t in TASKS}
    for s in held_out:
        q, ref = s.turns[-1]
        counts = by_question.get(q) or by_task.get(s.task)
        right_n = out.setdefault(s.task, [0.0, 0])
        right_n[0] += score(s.task, counts.most_common(1)[0][0] if counts else "", ref)
        right_n[1] += 1
    return {t: (right, n) for t, (right, n) in out.items()}


def eval_samples(seed: int, n: int, canvas: int) -> list[Sample]:
    """The first n samples of the held-out synthetic split."""
    return [synthetic_sample(seed, "eval", i, canvas) for i in range(n)]


def eval_per_task(seed: int, per_task: int, canvas: int) -> list[Sample]:
    """The first per_task held-out samples of every task, in held-out order."""
    out, counts, i = [], Counter(), 0
    while min(counts[t] for t in TASKS) < per_task:
        s = synthetic_sample(seed, "eval", i, canvas)
        i += 1
        if counts[s.task] < per_task:
            counts[s.task] += 1
            out.append(s)
    return out


def train_samples(seed: int, n: int, canvas: int, tasks_per_image: int = 1) -> list[Sample]:
    """The first n samples of the synthetic training stream, as a synthetic run draws them."""
    src = SampleSource([{"path": "synthetic", "ratio": 1, "tasks_per_image": tasks_per_image}], seed, canvas,
                       synthetic=synthetic_sample)
    return [src.next() for _ in range(n)]


if __name__ == "__main__":
    # python world.py eval 3 docs/scene.png: save synthetic sample 3 of a split (seed 0) as an image file.
    import sys
    split, index, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    s = synthetic_sample(0, split, index, 128)
    if s.image is None:
        sys.exit(f"{split} sample {index} is a language-only sample (no image)")
    s.image.save(path)
    print(f"{path}: {split} sample {index} ({s.task}): {s.turns}")
