"""Run as ``-m tests.integration.launch_scripts.pkg.entry``: proves __name__ == "__main__" and the package import."""
import os

if __name__ == "__main__":
    with open(os.path.join(os.environ["OUT_DIR"], f"module.{os.environ['RANK']}"), "w") as f:
        f.write(__spec__.name if __spec__ else "")
