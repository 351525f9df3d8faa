import types

import daskrun


def test_all_is_sorted_and_lists_every_public_member() -> None:
    members = {
        name
        for name, value in vars(daskrun).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and getattr(value, "__module__", "").startswith("daskrun")
    }
    assert daskrun.__all__ == sorted(daskrun.__all__)
    assert set(daskrun.__all__) == members
