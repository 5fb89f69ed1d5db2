"""The config fingerprint (checked when a run resumes or a cache loads) must not change when a
release adds an option that is off by default."""

import dataclasses

from hybrid import HybridConfig
from hybrid.config import changed_fields
from layers.mamba2 import Mamba2Options


def test_fields_at_their_default_are_left_out():
    options = Mamba2Options(d_state=16, headdim=8).resolve(32, "mamba2")
    assert changed_fields(options) == {"d_state": 16, "headdim": 8}


def test_fingerprint_ignores_a_new_default_off_option():
    config = HybridConfig("M*-", vocab_size=32, d_model=32, mamba2={"headdim": 8})
    before = config.fingerprint()

    # the same resolved options with one more field at its default: same fingerprint
    @dataclasses.dataclass
    class Extended(Mamba2Options):
        new_switch: bool = False

    config.layer_options[0] = Extended(**dataclasses.asdict(config.layer_options[0]))
    assert config.fingerprint() == before
    config.layer_options[0].new_switch = True
    assert config.fingerprint() != before


def test_fingerprint_sees_options_inside_parallel():
    a = HybridConfig("[*M]", vocab_size=32, d_model=32, mamba2={"headdim": 8})
    b = HybridConfig("[*M]", vocab_size=32, d_model=32, mamba2={"headdim": 8, "d_state": 16})
    assert a.fingerprint() != b.fingerprint()
