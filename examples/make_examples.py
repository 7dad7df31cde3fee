"""Draw the example images (64 x 64 px, the demo model's size) with the demo's own scene drawing.

    python examples/make_examples.py          # rewrites examples/*.png

Each scene is placed by hand, so the answers in examples/README.md are known.
"""
from __future__ import annotations

import os

from jblip.train.synthetic import Item, Scene, draw_scene

SIZE = 64
SCENES = {
    "red_circle.png": Scene("white", (Item("circle", "red", 31, 33, 17),)),
    "green_triangle.png": Scene("grey", (Item("triangle", "green", 45, 30, 11),)),
    "blue_square.png": Scene("black", (Item("square", "blue", 16, 38, 10),)),
    "yellow_square.png": Scene("grey", (Item("square", "yellow", 34, 30, 18),)),
    "two_shapes.png": Scene("black", (Item("circle", "green", 15, 22, 10), Item("triangle", "red", 47, 40, 11))),
    "three_shapes.png": Scene("white", (Item("triangle", "blue", 10, 20, 8), Item("circle", "green", 32, 44, 8),
                                         Item("square", "red", 53, 24, 8))),
}


def main(directory: str = os.path.dirname(os.path.abspath(__file__))):
    for name, scene in SCENES.items():
        draw_scene(scene, SIZE).save(os.path.join(directory, name))
        print(os.path.join(directory, name))


if __name__ == "__main__":
    main()
