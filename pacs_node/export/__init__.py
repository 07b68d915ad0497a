"""De-identified research exports (DICOM PS3.15 Annex E): `pacs-node export`.

profile.py   the TOML profile: what is done to which attribute, validated against Table E.1-1
table.py     Table E.1-1 (Basic Profile and the implemented options)
deidentify.py applying a profile: pseudonyms, UIDs, dates, ages, descriptors, private tags
writer.py    reading a stored instance in parts, writing the copy (pixel data unchanged)
select.py    which instances (C-FIND keys over the index)
state.py     the export's journal and encrypted identifier mapping on the node (resume)
manifest.py  manifest.csv / manifest.jsonl / README.md
run.py       one export start to finish, with its audit records
(the click command, `export_command`, is `pacs_node/cli/export.py`)
"""
