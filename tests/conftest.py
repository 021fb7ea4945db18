import pytest

from lr_guard.data import load_curve


@pytest.fixture
def curve():
    return load_curve
