from loadstar.engine.plugins.hookspecs import hookimpl


@hookimpl
def register_loader(register):  # typo: the hook is register_loaders
    pass
