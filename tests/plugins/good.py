from loadstar.engine.plugins.hookspecs import hookimpl
from tests.fakes import FakeLoader


@hookimpl
def register_loaders(register):
    register(FakeLoader("Good", priority=70))
