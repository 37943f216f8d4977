from brickwork.cli import entrypoint

entrypoint()
