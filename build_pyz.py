#!/usr/bin/env python3
"""Build localswarm.pyz: localswarm.py + models.json + __main__.py as a stdlib zipapp.

The archive is reproducible (sorted entries, fixed timestamps), so two builds of the same
sources are byte-identical. Usage: python build_pyz.py [-o localswarm.pyz]
"""
import argparse
import os
import shutil
import sys
import tempfile
import zipapp

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = ["localswarm.py", "models.json"]
FIXED_MTIME = 315964800   # 1980-01-06: zip timestamps cannot go earlier than 1980

MAIN = '''import sys
if sys.version_info < (3, 9):
    sys.exit("localswarm needs Python 3.9 or newer (this is %d.%d)" % sys.version_info[:2])
import localswarm
localswarm.run()
'''


def build(target: str) -> str:
    """Write the archive to target and return its path."""
    with tempfile.TemporaryDirectory() as stage:
        for name in FILES:
            shutil.copyfile(os.path.join(HERE, name), os.path.join(stage, name))
        with open(os.path.join(stage, "__main__.py"), "w", encoding="utf-8") as f:
            f.write(MAIN)
        for name in os.listdir(stage):
            os.utime(os.path.join(stage, name), (FIXED_MTIME, FIXED_MTIME))
        tmp = target + ".tmp"
        zipapp.create_archive(stage, tmp, interpreter="/usr/bin/env python3", compressed=True)
        os.replace(tmp, target)       # never leave a half-written archive
    return target


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default=os.path.join(HERE, "localswarm.pyz"),
                    help="where to write the archive (default: %(default)s)")
    out = build(ap.parse_args().output)
    print(f"built {out} ({os.path.getsize(out):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
