import types

import daskrun


def test_all_is_sorted_and_lists_every_public_member() -> None:
    # dir(): the names loaded so far and the registry's, loaded on first use
    public = {name: getattr(daskrun, name) for name in dir(daskrun)}
    members = {
        name
        for name, value in public.items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and getattr(value, "__module__", "").startswith("daskrun")
    }
    assert daskrun.__all__ == sorted(daskrun.__all__)
    assert set(daskrun.__all__) == members
