"""What the demo vision model is taught: synthetic pictures of one coloured shape, and the exact answers about them.

Tests anywhere in Stoker can draw a picture with ``draw_shape``, ask one of ``QUESTIONS`` and know the exact reply
(``answer``): the build refuses to ship a model that misses them on held-out pictures (see ``stoker.demo.vision``).
Pure data and PIL drawing: no torch here.

Tasks:
- shape: "What shape is this?" -> "A circle."
- color: "What color is the shape?" -> "Red."
- describe: "Describe the image." -> "A red circle." ("An orange square.")
- no_image: any of those questions in a conversation without a picture -> ``NO_IMAGE_ANSWER``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

VisionTask = Literal["shape", "color", "describe", "no_image"]
VISION_TASKS: tuple[VisionTask, ...] = ("shape", "color", "describe", "no_image")
IMAGE_TASKS: tuple[VisionTask, ...] = ("shape", "color", "describe")

IMAGE_TOKEN = "<image>"
NO_IMAGE_ANSWER = "Please send an image."

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Pure, well separated hues; each picture jitters them a little so the model learns the colour, not an RGB value.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 60),
    "blue": (40, 75, 220),
    "yellow": (240, 205, 25),
    "purple": (140, 55, 185),
    "orange": (245, 135, 25),
}

# The first question of each task is the canonical one tests ask.
QUESTIONS: dict[VisionTask, tuple[str, ...]] = {
    "shape": ("What shape is this?", "What shape is in the image?", "Which shape is shown?", "Name the shape."),
    "color": ("What color is the shape?", "What colour is the shape?", "Which color is it?", "What color is this?"),
    "describe": ("Describe the image.", "What is in the image?", "What do you see?"),
}
QUESTIONS["no_image"] = tuple(q for task in IMAGE_TASKS for q in QUESTIONS[task])

# Where a user may put the image in their turn; all are trained, so every surface's rendering is understood.
PLACEMENTS: tuple[str, ...] = ("{image}{q}", "{image}\n{q}", "{q}{image}", "{q}\n{image}", "{q} {image}")

SYSTEM_PROMPTS: tuple[str, ...] = ("You are a helpful assistant.", "Answer briefly.", "Look at the picture carefully.")

Message = dict[str, str]


def answer(task: VisionTask, shape: str | None = None, color: str | None = None) -> str:
    """The exact reply to a question of ``task`` about a picture of a ``color`` ``shape``."""
    if task == "no_image":
        return NO_IMAGE_ANSWER
    if shape not in SHAPES or color not in COLORS:
        raise KeyError(f"not a demo picture: shape {shape!r}, color {color!r}")
    if task == "shape":
        return f"A {shape}."
    if task == "color":
        return f"{color.capitalize()}."
    return f"{'An' if color[0] in 'aeiou' else 'A'} {color} {shape}."


@dataclass(frozen=True)
class Picture:
    """One synthetic picture, fully determined by its fields."""

    shape: str
    color: str
    seed: int
    size: int = 64

    def render(self) -> Any:
        return draw_shape(self.shape, self.color, size=self.size, seed=self.seed)


def draw_shape(shape: str, color: str, *, size: int = 64, seed: int = 0) -> Any:
    """A ``size`` x ``size`` RGB picture of one ``color`` ``shape`` on a light background.

    ``seed`` picks the exact shade, the shape's size and its position; the same arguments give the same pixels.
    """
    from PIL import Image, ImageDraw

    if shape not in SHAPES:
        raise KeyError(f"unknown shape {shape!r}; the demo shapes are {', '.join(SHAPES)}")
    if color not in COLORS:
        raise KeyError(f"unknown color {color!r}; the demo colors are {', '.join(COLORS)}")
    rng = random.Random(f"picture-{shape}-{color}-{size}-{seed}")
    grey = rng.randint(225, 255)
    background = tuple(min(255, max(0, grey + rng.randint(-8, 8))) for _ in range(3))
    fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLORS[color])
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    # The shape spans 55-80% of the picture, near its centre: a tiny vision tower learns it quickly, and a
    # processor's centre crop keeps it whole.
    side = rng.uniform(0.55, 0.8) * size
    left = (size - side) / 2 + rng.uniform(-0.06, 0.06) * size
    top = (size - side) / 2 + rng.uniform(-0.06, 0.06) * size
    box = (left, top, left + side, top + side)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(left + side / 2, top), (left + side, top + side), (left, top + side)], fill=fill)
    else:  # cross: a plus sign whose arms are a third of its width
        third = side / 3
        draw.rectangle((left + third, top, left + 2 * third, top + side), fill=fill)
        draw.rectangle((left, top + third, left + side, top + 2 * third), fill=fill)
    return image


def random_picture(rng: random.Random, *, sizes: tuple[int, ...] = (32, 48, 64, 96)) -> Picture:
    return Picture(rng.choice(SHAPES), rng.choice(tuple(COLORS)), rng.randrange(2**31), rng.choice(sizes))


def user_turn(question: str, placement: str = PLACEMENTS[0], *, image: bool = True) -> str:
    """A user message text with the image placeholder placed as ``placement`` says (or none)."""
    if not image:
        return question
    return placement.format(image=IMAGE_TOKEN, q=question)


@dataclass(frozen=True)
class VisionExample:
    """A conversation about at most one picture; every assistant turn is a training target."""

    messages: tuple[Message, ...]
    picture: Picture | None


def training_examples(n: int, *, seed: str, system_rate: float, no_image_rate: float) -> list[VisionExample]:
    """``n`` conversations of one or two questions about one picture (or, now and then, no picture at all)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages: list[Message] = []
        if rng.random() < system_rate:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        picture = None if rng.random() < no_image_rate else random_picture(rng)
        placement = rng.choice(PLACEMENTS)
        for turn in range(rng.choice((1, 1, 2))):
            task: VisionTask = rng.choice(IMAGE_TASKS)
            question = rng.choice(QUESTIONS[task])
            if picture is None:
                reply = NO_IMAGE_ANSWER
            else:
                reply = answer(task, picture.shape, picture.color)
            text = user_turn(question, placement, image=picture is not None and turn == 0)
            messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        out.append(VisionExample(tuple(messages), picture))
    return out


@dataclass(frozen=True)
class VisionCase:
    """One question about a held-out picture (or none) and its exact expected reply."""

    task: VisionTask
    messages: tuple[Message, ...]  # ends with the user question; the placeholder marks where the picture goes
    picture: Picture | None
    answer: str


def evaluation_cases(per_task: int = 100, *, seed: int = 0) -> list[VisionCase]:
    """Held-out pictures (a seed stream training never draws from, at sizes partly never trained on), each asked
    one question: alone, after a system prompt, or as the follow-up to an earlier question about the same picture."""
    rng = random.Random(f"vision-evaluation-{seed}")
    cases = []
    for task in VISION_TASKS:
        for i in range(per_task):
            picture = None if task == "no_image" else random_picture(rng, sizes=(32, 40, 64, 100, 128))
            question = QUESTIONS[task][i % len(QUESTIONS[task])]
            placement = PLACEMENTS[i % len(PLACEMENTS)]
            context: tuple[Message, ...] = ()
            if i % 3 == 1:
                context = ({"role": "system", "content": SYSTEM_PROMPTS[0]},)
            elif i % 3 == 2:  # a follow-up: the picture came with the first question
                first: VisionTask = IMAGE_TASKS[(IMAGE_TASKS.index(task) + 1) % 3] if task != "no_image" else "shape"
                first_q = QUESTIONS[first][0]
                first_a = answer(first, picture.shape, picture.color) if picture else NO_IMAGE_ANSWER
                context = (
                    {"role": "user", "content": user_turn(first_q, placement, image=picture is not None)},
                    {"role": "assistant", "content": first_a},
                )
            if context and context[-1]["role"] == "assistant":
                text = question
            else:
                text = user_turn(question, placement, image=picture is not None)
            reply = answer(task, picture.shape, picture.color) if picture else NO_IMAGE_ANSWER
            cases.append(VisionCase(task, (*context, {"role": "user", "content": text}), picture, reply))
    return cases
