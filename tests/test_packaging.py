"""One installed import package: `jblip`, with the repository's convert/ and train/ folders as
jblip.convert and jblip.train (no top-level `convert` or `train` module that could clash)."""
import importlib
import importlib.metadata
import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_distribution_installs_jblip_alone():
    top_level = importlib.metadata.distribution("jblip").read_text("top_level.txt").split()
    assert top_level == ["jblip"]
    assert importlib.import_module("jblip.convert.rules") and importlib.import_module("jblip.train.loop")


def test_every_package_folder_is_installed():
    """A new subpackage (a folder with __init__.py) must be listed in pyproject.toml, or a wheel
    install would lack it while the source tree works."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        tool = tomllib.load(f)["tool"]["setuptools"]
    mapped = {folder: name for name, folder in tool["package-dir"].items()}
    found = set()
    for top in ("jblip", "convert", "train"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            if "__init__.py" in files:
                rel = os.path.relpath(folder, ROOT).split(os.sep)
                found.add(".".join([mapped.get(rel[0], rel[0]), *rel[1:]]))
    assert found == set(tool["packages"])
