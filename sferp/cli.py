"""Command-line entry point."""


def main() -> None:
    """Run the sferp command line."""
    print("sferp")
