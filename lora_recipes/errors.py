"""Errors a user can fix, reported as one line with no traceback."""

import functools
import sys


class RecipeError(Exception):
    """A problem with the user's input or setup; the message names the file, row and field where there is one."""


def exit_on_recipe_error(fn):
    """Run `fn`, turning a RecipeError into `error: <message>` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RecipeError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
