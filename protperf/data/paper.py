"""The paper's dataset choices (TrEMBL, January 2019), as defaults of ``prepare-data``.

Constants only, so that the command line can show them without importing numpy or h5py.
"""

from __future__ import annotations

PAPER_RELEASE = "2019_01"
SPLITS = ("train", "valid", "test", "ood")
#: Table 1's split sizes as fractions of TrEMBL 2019_01's 106,030,080 unique sequences.
PAPER_VALID_FRACTION = 102_400 / 106_030_080
PAPER_TEST_FRACTION = 1_033_216 / 106_030_080
#: The held-out Pfam families of the paper's OOD set (from ProGen).
PAPER_OOD_FAMILIES = (
    *("PF18369", "PF04680", "PF17988", "PF12325", "PF03272", "PF03938", "PF17724"),
    *("PF10696", "PF11968", "PF04153", "PF06173", "PF12378", "PF04420", "PF10841"),
    *("PF06917", "PF03492", "PF06905", "PF15340", "PF17055", "PF05318"),
)
