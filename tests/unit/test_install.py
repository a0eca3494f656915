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
