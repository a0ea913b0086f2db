import json

import pytest

from fusion.config import Config, ConfigError, get_config, parse_override


def test_presets_build_and_validate():
    for preset in ("tiny", "small", "r50"):
        config = get_config(preset)
        assert config.preset == preset
    r50 = get_config("r50")
    assert (r50.grid.size_x, r50.grid.size_y) == (180, 180)
    assert (r50.rig.num_cameras, r50.rig.image_height, r50.rig.image_width) == (6, 256, 704)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        get_config("huge")


def test_unknown_keys_are_rejected_at_every_level():
    with pytest.raises(ConfigError, match="model.fuserr"):
        get_config("tiny", {"model.fuserr": "se"})
    with pytest.raises(ConfigError, match="nope"):
        get_config("tiny", {"nope.x": 1})
    data = get_config("tiny").to_dict()
    data["train"]["stepz"] = 3
    with pytest.raises(ConfigError, match="config.train.stepz"):
        Config.from_dict(data)


def test_invalid_values_are_rejected():
    with pytest.raises(ConfigError, match="fuser"):
        get_config("tiny", {"model.fuser": "attention"})
    with pytest.raises(ConfigError, match="camera_depth"):
        get_config("tiny", {"model.camera_depth": 20})
    with pytest.raises(ConfigError, match="multiple of 32"):
        get_config("tiny", {"rig.image_height": 70})


def test_json_round_trip_is_exact():
    config = get_config("small", {"model.fuser": "se", "train.steps": 7})
    again = Config.from_dict(json.loads(config.to_json()))
    assert again == config
    assert again.model.decoder_channels == (64, 128)  # tuples survive JSON


def test_parse_override_reads_json_values():
    assert parse_override("train.steps=500") == ("train.steps", 500)
    assert parse_override("model.fuser=se") == ("model.fuser", "se")
    assert parse_override("data.objects_per_scene=[2, 3]") == ("data.objects_per_scene", [2, 3])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.steps")
