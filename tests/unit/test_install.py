"""`make setup` hands pip's package sources to uv (.ci/pip_to_uv.py): what pip obeys is what
uv is told, so both install the same set."""

import importlib.util

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("pip_to_uv", ROOT / ".ci" / "pip_to_uv.py")
pip_to_uv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pip_to_uv)


def test_pip_config_becomes_uv_flags():
    # `pip config list` as on these machines: a file and the environment both set
    # find-links (the environment wins, as in pip); lists split on whitespace
    listing = "\n".join([
        ":env:.default-timeout='180'",
        ":env:.find-links='/opt/wheels'",
        "global.constraint='/etc/xdg/pip/constraints.txt'",
        "global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'",
        "global.find-links='/elsewhere'",
        "user.index-url='https://mirror.example/simple'",
        "global.cert='/etc/ssl/certs/ca-certificates.crt'",  # uv has no flag for it
    ])
    assert pip_to_uv.uv_flags(listing) == [
        "--find-links", "/opt/wheels",
        "--constraint", "/etc/xdg/pip/constraints.txt",
        "--extra-index-url", "file:///opt/pypi/simple",
        "--extra-index-url", "file:///opt/pypi-more/simple",
        "--index-url", "https://mirror.example/simple",
    ]
    assert pip_to_uv.uv_flags("") == []
    assert pip_to_uv.uv_flags("global.no-index='true'\n") == ["--no-index"]
    # a site (venv) file beats the user's, whatever the order pip lists them in
    assert pip_to_uv.uv_flags("site.find-links='/a'\nuser.find-links='/b'") == \
        ["--find-links", "/a"]


def test_the_package_ships_what_users_import():
    """The wheel's packages (pyproject's find rules): rlhf, cluster, launch and their
    recipes and demos; no top-level `tests` package to shadow a user's own."""
    import tomllib

    from setuptools import find_packages

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = find_packages(where=str(ROOT), include=cfg["packages"]["find"]["include"])
    assert {"rlhf", "cluster", "launch"} <= set(found)
    # every folder of Python modules under them is a package the wheel carries (a folder
    # without __init__.py imports here as a namespace package and is left out of it)
    folders = {".".join(f.parent.relative_to(ROOT).parts)
               for top in ("rlhf", "cluster", "launch") for f in (ROOT / top).rglob("*.py")}
    assert folders <= set(found), folders - set(found)
    assert not [p for p in found if p.split(".")[0] in ("tests", "bench")]
    data = cfg["package-data"]["launch"]
    for pattern in data:
        assert list((ROOT / "launch").glob(pattern)), pattern
    assert {"recipes/*.yaml", "demos/*.yaml"} <= set(data)
