class UserError(Exception):
    """Bad input from the user: the CLI prints the message on one line and exits with code 2."""


class RunStopped(Exception):
    """A training run stopped on purpose (a signal, too many bad steps): the message says where
    its checkpoint is and how to resume; the CLI prints it and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
