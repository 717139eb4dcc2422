"""One set of naming rules: the parameters refuse exactly what the registry and S3 refuse."""

from __future__ import annotations

import pytest

from switchprune import registry, storage
from switchprune.config import SECTIONS, ConfigError, from_dict
from switchprune.registry import RegistryError


@pytest.mark.parametrize("alias", ["latest", "LATEST", "v2", "V10", "1st", "-x", "a b", "x" * 101])
def test_an_alias_the_registry_refuses_is_refused_as_a_parameter(alias: str) -> None:
    with pytest.raises(RegistryError, match="invalid (alias|model reference)"):
        registry.parse_model_ref(f"tiny@{alias}")
    for section in ("register", "promote"):
        with pytest.raises(ConfigError, match=rf"\[{section}\] alias"):
            from_dict(SECTIONS[section], {"alias": alias})


@pytest.mark.parametrize("alias", ["candidate", "champion", "staging_2", "v2a", "latest-good"])
def test_an_alias_the_registry_takes_is_taken_as_a_parameter(alias: str) -> None:
    assert registry.parse_model_ref(f"tiny@{alias}").alias == alias
    assert from_dict(SECTIONS["promote"], {"alias": alias}).alias == alias


@pytest.mark.parametrize("name", ["a" * 101, "-x", "a/b", ""])
def test_a_model_name_is_refused_alike_everywhere(name: str) -> None:
    with pytest.raises(ConfigError, match=r"\[register\] model_name"):
        from_dict(SECTIONS["register"], {"model_name": name})
    with pytest.raises(RegistryError):
        registry.parse_model_ref(name)


@pytest.mark.parametrize("bucket", ["a..b", "Bad", "ab", "-ab", "a" * 64])
def test_a_bucket_s3_refuses_is_refused_as_a_parameter(bucket: str) -> None:
    with pytest.raises(storage.StorageError, match="bucket"):
        storage.parse_s3_uri(f"s3://{bucket}/x")
    with pytest.raises(ConfigError, match=r"\[promote\] s3_uri"):
        from_dict(SECTIONS["promote"], {"s3_uri": f"s3://{bucket}/x"})
