"""Shared fixtures of the test suite (helpers live in tests/helpers.py)."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is fastest, and immune to oversubscribed (shared) cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(items):
    """The fast tier (`make test-fast`: -m "not slow") leaves out every test that builds the book
    (the `smoke_book` fixture) or drives a browser, besides those marked slow one by one."""
    for item in items:
        if "smoke_book" in getattr(item, "fixturenames", ()) or item.path.name == "test_book_browser.py":
            item.add_marker(pytest.mark.slow)
