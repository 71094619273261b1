"""The plan of a stage-01 run (tokenfold/db_plan.py): the embedded default inputs."""
from tokenfold.db_plan import embedded_default_inputs


def test_embedded_default_inputs():
    files = embedded_default_inputs()
    names = [f.name for f in files]
    assert len(files) >= 50 and all(f.exists() for f in files)
    assert not any(s in n for n in names for s in ("_invalid", "_short", "custom", "multimodel", "_failing"))
    stems = [n.split(".")[0] for n in names]
    assert len(stems) == len(set(stems))  # no entry twice (e.g. as .pdb and .cif)
