# ruff: noqa: F811 (pytest fixtures imported from tests.s3server are redefined as arguments)
"""`pacs-node export`: de-identified research exports, checked as a reviewer would check them.

A real node on a free port is filled over DICOM (pynetdicom sends the files' bytes unchanged);
the export runs as the command (click's runner, or `python -m pacs_node.export` in a child
process that is SIGKILLed mid-way); the S3 destination is the moto server over HTTP. What comes
out is read back with pydicom and compared with what went in, attribute by attribute against
Table E.1-1 of PS3.15 (written out below, independently of the code's own copy).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config

from pacs_node.audit import read_audit
from pacs_node.cli.export import export_command
from pacs_node.export.profile import parse_profile, render_profile
from pacs_node.export.state import read_mapping
from pacs_node.export.table import ROWS
from tests.conftest import NODE_AE, RunningNode
from tests.factory import Made, base_dataset, write_instance
from tests.s3server import (  # noqa: F401 (fixtures)
    MotoServer,
    _moto_process,
    bucket,
    s3_server,
)

KEY = "project-alpha-0123456789abcdef-secret"
OTHER_KEY = "project-beta-fedcba9876543210-secret"

# PS3.15 Table E.1-1 (2021-2023 editions): tag, Basic Application Level Confidentiality
# Profile action, attribute name. The private-attribute row (odd groups: X) is checked
# separately. Action codes: D dummy, Z zero-length (or dummy), X remove, U new consistent UID,
# and the compound codes: Z/D, X/Z, X/D, X/Z/D ("X unless Z or D is needed for the IOD") and
# X/Z/U* (sequences of references: removed, emptied, or kept with their UIDs replaced).
TABLE_E11 = """
0000,1000 X      Affected SOP Instance UID
0000,1001 U      Requested SOP Instance UID
0002,0003 U      Media Storage SOP Instance UID
0004,1511 U      Referenced SOP Instance UID in File
0008,0014 U      Instance Creator UID
0008,0015 X      Instance Coercion DateTime
0008,0018 U      SOP Instance UID
0008,0020 Z      Study Date
0008,0021 X/D    Series Date
0008,0022 X/Z    Acquisition Date
0008,0023 Z/D    Content Date
0008,0024 X      Overlay Date
0008,0025 X      Curve Date
0008,002A X/Z/D  Acquisition DateTime
0008,0030 Z      Study Time
0008,0031 X/D    Series Time
0008,0032 X/Z    Acquisition Time
0008,0033 Z/D    Content Time
0008,0034 X      Overlay Time
0008,0035 X      Curve Time
0008,0050 Z      Accession Number
0008,0058 U      Failed SOP Instance UID List
0008,0080 X/Z/D  Institution Name
0008,0081 X      Institution Address
0008,0082 X/Z/D  Institution Code Sequence
0008,0090 Z      Referring Physician's Name
0008,0092 X      Referring Physician's Address
0008,0094 X      Referring Physician's Telephone Numbers
0008,0096 X      Referring Physician Identification Sequence
0008,009C Z      Consulting Physician's Name
0008,009D X      Consulting Physician Identification Sequence
0008,0201 X      Timezone Offset From UTC
0008,1010 X/Z/D  Station Name
0008,1030 X      Study Description
0008,103E X      Series Description
0008,1040 X      Institutional Department Name
0008,1041 X      Institutional Department Type Code Sequence
0008,1048 X      Physician(s) of Record
0008,1049 X      Physician(s) of Record Identification Sequence
0008,1050 X      Performing Physician's Name
0008,1052 X      Performing Physician Identification Sequence
0008,1060 X      Name of Physician(s) Reading Study
0008,1062 X      Physician(s) Reading Study Identification Sequence
0008,1070 X/Z/D  Operators' Name
0008,1072 X/D    Operator Identification Sequence
0008,1080 X      Admitting Diagnoses Description
0008,1084 X      Admitting Diagnoses Code Sequence
0008,1110 X/Z    Referenced Study Sequence
0008,1111 X/Z/D  Referenced Performed Procedure Step Sequence
0008,1120 X      Referenced Patient Sequence
0008,1140 X/Z/U* Referenced Image Sequence
0008,1155 U      Referenced SOP Instance UID
0008,1195 U      Transaction UID
0008,2111 X      Derivation Description
0008,2112 X/Z/U* Source Image Sequence
0008,3010 U      Irradiation Event UID
0008,4000 X      Identifying Comments
0010,0010 Z      Patient's Name
0010,0020 Z      Patient ID
0010,0021 X      Issuer of Patient ID
0010,0030 Z      Patient's Birth Date
0010,0032 X      Patient's Birth Time
0010,0040 Z      Patient's Sex
0010,0050 X      Patient's Insurance Plan Code Sequence
0010,0101 X      Patient's Primary Language Code Sequence
0010,0102 X      Patient's Primary Language Modifier Code Sequence
0010,1000 X      Other Patient IDs
0010,1001 X      Other Patient Names
0010,1002 X      Other Patient IDs Sequence
0010,1005 X      Patient's Birth Name
0010,1010 X      Patient's Age
0010,1020 X      Patient's Size
0010,1030 X      Patient's Weight
0010,1040 X      Patient's Address
0010,1050 X      Insurance Plan Identification
0010,1060 X      Patient's Mother's Birth Name
0010,1080 X      Military Rank
0010,1081 X      Branch of Service
0010,1090 X      Medical Record Locator
0010,1100 X      Referenced Patient Photo Sequence
0010,2000 X      Medical Alerts
0010,2110 X      Allergies
0010,2150 X      Country of Residence
0010,2152 X      Region of Residence
0010,2154 X      Patient's Telephone Numbers
0010,2155 X      Patient's Telecom Information
0010,2160 X      Ethnic Group
0010,2180 X      Occupation
0010,21A0 X      Smoking Status
0010,21B0 X      Additional Patient History
0010,21C0 X      Pregnancy Status
0010,21D0 X      Last Menstrual Date
0010,21F0 X      Patient's Religious Preference
0010,2203 X/Z    Patient's Sex Neutered
0010,2297 X      Responsible Person
0010,2299 X      Responsible Organization
0010,4000 X      Patient Comments
0012,0010 D      Clinical Trial Sponsor Name
0012,0020 D      Clinical Trial Protocol ID
0012,0021 Z      Clinical Trial Protocol Name
0012,0030 Z      Clinical Trial Site ID
0012,0031 Z      Clinical Trial Site Name
0012,0040 D      Clinical Trial Subject ID
0012,0042 D      Clinical Trial Subject Reading ID
0012,0050 Z      Clinical Trial Time Point ID
0012,0051 X      Clinical Trial Time Point Description
0012,0060 Z      Clinical Trial Coordinating Center Name
0012,0071 X      Clinical Trial Series ID
0012,0072 X      Clinical Trial Series Description
0012,0081 D      Clinical Trial Protocol Ethics Committee Name
0012,0082 X      Clinical Trial Protocol Ethics Committee Approval Number
0016,002B X      Maker Note
0016,004B X      Device Setting Description
0016,004D X      Camera Owner Name
0016,004E X      Lens Specification
0016,004F X      Lens Make
0016,0050 X      Lens Model
0016,0051 X      Lens Serial Number
0016,0070 X      GPS Version ID
0016,0071 X      GPS Latitude Ref
0016,0072 X      GPS Latitude
0016,0073 X      GPS Longitude Ref
0016,0074 X      GPS Longitude
0016,0075 X      GPS Altitude Ref
0016,0076 X      GPS Altitude
0016,0077 X      GPS Time Stamp
0016,0078 X      GPS Satellites
0016,0079 X      GPS Status
0016,007A X      GPS Measure Mode
0016,007B X      GPS DOP
0016,007C X      GPS Speed Ref
0016,007D X      GPS Speed
0016,007E X      GPS Track Ref
0016,007F X      GPS Track
0016,0080 X      GPS Img Direction Ref
0016,0081 X      GPS Img Direction
0016,0082 X      GPS Map Datum
0016,0083 X      GPS Dest Latitude Ref
0016,0084 X      GPS Dest Latitude
0016,0085 X      GPS Dest Longitude Ref
0016,0086 X      GPS Dest Longitude
0016,0087 X      GPS Dest Bearing Ref
0016,0088 X      GPS Dest Bearing
0016,0089 X      GPS Dest Distance Ref
0016,008A X      GPS Dest Distance
0016,008B X      GPS Processing Method
0016,008C X      GPS Area Information
0016,008D X      GPS Date Stamp
0016,008E X      GPS Differential
0018,0010 Z/D    Contrast/Bolus Agent
0018,1000 X/Z/D  Device Serial Number
0018,1002 U      Device UID
0018,1004 X      Plate ID
0018,1005 X      Generator ID
0018,1007 X      Cassette ID
0018,1008 X      Gantry ID
0018,1009 X      Unique Device Identifier
0018,100A X      UDI Sequence
0018,100B U      Manufacturer's Device Class UID
0018,1030 X/D    Protocol Name
0018,11BB D      Acquisition Field Of View Label
0018,1400 X/D    Acquisition Device Processing Description
0018,2042 U      Target UID
0018,4000 X      Acquisition Comments
0018,5011 X      Transducer Identification Sequence
0018,700A X/D    Detector ID
0018,9185 X      Respiratory Motion Compensation Technique Description
0018,9367 D      X-Ray Source ID
0018,9369 D      Source Start DateTime
0018,936A D      Source End DateTime
0018,9371 D      X-Ray Detector ID
0018,9373 X      X-Ray Detector Label
0018,937B X      Multi-energy Acquisition Description
0018,937F X      Decomposition Description
0018,9424 X      Acquisition Protocol Description
0018,9516 X/D    Start Acquisition DateTime
0018,9517 X/D    End Acquisition DateTime
0018,9937 X      Requested Series Description
0018,A003 X      Contribution Description
0020,000D U      Study Instance UID
0020,000E U      Series Instance UID
0020,0010 Z      Study ID
0020,0052 U      Frame of Reference UID
0020,0200 U      Synchronization Frame of Reference UID
0020,3401 X      Modifying Device ID
0020,3406 X      Modified Image Description
0020,4000 X      Image Comments
0020,9158 X      Frame Comments
0020,9161 U      Concatenation UID
0020,9164 U      Dimension Organization UID
0028,1199 U      Palette Color Lookup Table UID
0028,1214 U      Large Palette Color Lookup Table UID
0028,4000 X      Image Presentation Comments
0032,0012 X      Study ID Issuer
0032,1020 X      Scheduled Study Location
0032,1021 X      Scheduled Study Location AE Title
0032,1030 X      Reason for Study
0032,1032 X      Requesting Physician
0032,1033 X      Requesting Service
0032,1060 X/Z    Requested Procedure Description
0032,1066 X      Reason for Visit
0032,1067 X      Reason for Visit Code Sequence
0032,1070 X      Requested Contrast Agent
0032,4000 X      Study Comments
0034,0001 D      Flow Identifier Sequence
0034,0002 D      Flow Identifier
0034,0005 D      Source Identifier
0034,0007 D      Frame Origin Timestamp
0038,0004 X      Referenced Patient Alias Sequence
0038,0010 X      Admission ID
0038,0011 X      Issuer of Admission ID
0038,0014 X      Issuer of Admission ID Sequence
0038,001E X      Scheduled Patient Institution Residence
0038,0020 X      Admitting Date
0038,0021 X      Admitting Time
0038,0040 X      Discharge Diagnosis Description
0038,0050 X      Special Needs
0038,0060 X      Service Episode ID
0038,0061 X      Issuer of Service Episode ID
0038,0062 X      Service Episode Description
0038,0064 X      Issuer of Service Episode ID Sequence
0038,0300 X      Current Patient Location
0038,0400 X      Patient's Institution Residence
0038,0500 X      Patient State
0038,4000 X      Visit Comments
003A,0310 U      Multiplex Group UID
003A,0314 D      Impedance Measurement DateTime
0040,0001 X      Scheduled Station AE Title
0040,0002 X      Scheduled Procedure Step Start Date
0040,0003 X      Scheduled Procedure Step Start Time
0040,0004 X      Scheduled Procedure Step End Date
0040,0005 X      Scheduled Procedure Step End Time
0040,0006 X      Scheduled Performing Physician's Name
0040,0007 X      Scheduled Procedure Step Description
0040,0009 X      Scheduled Procedure Step ID
0040,000B X      Scheduled Performing Physician Identification Sequence
0040,0010 X      Scheduled Station Name
0040,0011 X      Scheduled Procedure Step Location
0040,0012 X      Pre-Medication
0040,0241 X      Performed Station AE Title
0040,0242 X      Performed Station Name
0040,0243 X      Performed Location
0040,0244 X      Performed Procedure Step Start Date
0040,0245 X      Performed Procedure Step Start Time
0040,0250 X      Performed Procedure Step End Date
0040,0251 X      Performed Procedure Step End Time
0040,0253 X      Performed Procedure Step ID
0040,0254 X      Performed Procedure Step Description
0040,0275 X      Request Attributes Sequence
0040,0280 X      Comments on the Performed Procedure Step
0040,0310 X      Comments on Radiation Dose
0040,050A X      Specimen Accession Number
0040,0512 D      Container Identifier
0040,0513 Z      Issuer of the Container Identifier Sequence
0040,051A X      Container Description
0040,0551 D      Specimen Identifier
0040,0554 U      Specimen UID
0040,0555 X/Z    Acquisition Context Sequence
0040,0562 Z      Issuer of the Specimen Identifier Sequence
0040,0600 X      Specimen Short Description
0040,0602 X      Specimen Detailed Description
0040,0610 Z      Specimen Preparation Sequence
0040,06FA X      Slide Identifier
0040,1001 X      Requested Procedure ID
0040,1002 X      Reason for the Requested Procedure
0040,1004 X      Patient Transport Arrangements
0040,1005 X      Requested Procedure Location
0040,100A X      Reason for Requested Procedure Code Sequence
0040,1010 X      Names of Intended Recipients of Results
0040,1011 X      Intended Recipients of Results Identification Sequence
0040,1101 D      Person Identification Code Sequence
0040,1102 X      Person's Address
0040,1103 X      Person's Telephone Numbers
0040,1104 X      Person's Telecom Information
0040,1400 X      Requested Procedure Comments
0040,2001 X      Reason for the Imaging Service Request
0040,2008 X      Order Entered By
0040,2009 X      Order Enterer's Location
0040,2010 X      Order Callback Phone Number
0040,2011 X      Order Callback Telecom Information
0040,2016 Z      Placer Order Number / Imaging Service Request
0040,2017 Z      Filler Order Number / Imaging Service Request
0040,2400 X      Imaging Service Request Comments
0040,3001 X      Confidentiality Constraint on Patient Data Description
0040,4005 X      Scheduled Procedure Step Start DateTime
0040,4008 X      Scheduled Procedure Step Expiration DateTime
0040,4010 X      Scheduled Procedure Step Modification DateTime
0040,4011 X      Expected Completion DateTime
0040,4023 U      Referenced General Purpose Scheduled Procedure Step Transaction UID
0040,4025 X      Scheduled Station Name Code Sequence
0040,4027 X      Scheduled Station Geographic Location Code Sequence
0040,4028 X      Performed Station Name Code Sequence
0040,4030 X      Performed Station Geographic Location Code Sequence
0040,4034 X      Scheduled Human Performers Sequence
0040,4035 X      Actual Human Performers Sequence
0040,4036 X      Human Performer's Organization
0040,4037 X      Human Performer's Name
0040,4050 X      Performed Procedure Step Start DateTime
0040,4051 X      Performed Procedure Step End DateTime
0040,4052 X      Procedure Step Cancellation DateTime
0040,A027 D      Verifying Organization
0040,A073 D      Verifying Observer Sequence
0040,A075 D      Verifying Observer Name
0040,A078 X      Author Observer Sequence
0040,A07A X      Participant Sequence
0040,A07C X      Custodial Organization Sequence
0040,A088 Z      Verifying Observer Identification Code Sequence
0040,A123 D      Person Name
0040,A124 U      UID
0040,A171 U      Observation UID
0040,A172 U      Referenced Observation UID (Trial)
0040,A192 X      Observation Date (Trial)
0040,A193 X      Observation Time (Trial)
0040,A307 X      Current Observer (Trial)
0040,A352 X      Verbal Source (Trial)
0040,A353 X      Address (Trial)
0040,A354 X      Telephone Number (Trial)
0040,A358 X      Verbal Source Identifier Code Sequence (Trial)
0040,A402 U      Observation Subject UID (Trial)
0040,A730 D      Content Sequence
0040,DB0C U      Template Extension Organization UID
0040,DB0D U      Template Extension Creator UID
0050,001B X      Container Component ID
0050,0020 X      Device Description
0050,0021 X      Long Device Description
0062,0021 U      Tracking UID
0070,0001 D      Graphic Annotation Sequence
0070,0084 Z/D    Content Creator's Name
0070,0086 X      Content Creator's Identification Code Sequence
0070,031A U      Fiducial UID
0070,1101 U      Presentation Display Collection UID
0070,1102 U      Presentation Sequence Collection UID
0088,0140 U      Storage Media File-set UID
0088,0200 X      Icon Image Sequence
0088,0904 X      Topic Title
0088,0906 X      Topic Subject
0088,0910 X      Topic Author
0088,0912 X      Topic Keywords
0400,0100 U      Digital Signature UID
0400,0402 X      Referenced Digital Signature Sequence
0400,0403 X      Referenced SOP Instance MAC Sequence
0400,0404 X      MAC
0400,0550 X      Modified Attributes Sequence
0400,0551 X      Nonconforming Modified Attributes Sequence
0400,0552 X      Nonconforming Data Element Value
0400,0561 X      Original Attributes Sequence
0400,0600 X      Instance Origin Status
2030,0020 X      Text String
2200,0002 X/Z    Label Text
2200,0005 X/Z    Barcode Value
3006,0002 D      Structure Set Label
3006,0004 X      Structure Set Name
3006,0006 X      Structure Set Description
3006,0008 Z      Structure Set Date
3006,0009 X/D    Structure Set Time
3006,0024 U      Referenced Frame of Reference UID
3006,0026 Z      ROI Name
3006,0028 X      ROI Description
3006,0038 X      ROI Generation Description
3006,0085 X      ROI Observation Label
3006,0088 X      ROI Observation Description
3006,00A6 Z      ROI Interpreter
3006,00C2 U      Related Frame of Reference UID
3008,0054 X/D    First Treatment Date
3008,0056 X/D    Most Recent Treatment Date
3008,0105 X/Z    Source Serial Number
3008,0250 X/D    Treatment Date
3008,0251 X/D    Treatment Time
300A,0002 D      RT Plan Label
300A,0003 X      RT Plan Name
300A,0004 X      RT Plan Description
300A,0006 X/D    RT Plan Date
300A,0007 X/D    RT Plan Time
300A,000E X      Prescription Description
300A,0013 U      Dose Reference UID
300A,0016 X      Dose Reference Description
300A,0072 X      Fraction Group Description
300A,0083 U      Referenced Dose Reference UID
300A,00B2 X      Treatment Machine Name
300A,00C3 X      Beam Description
300A,00DD X      Bolus Description
300A,0196 X      Fixation Device Description
300A,01A6 X      Shielding Device Description
300A,01B2 X      Setup Technique Description
300A,0216 X      Source Manufacturer
300A,02EB X      Compensator Description
300A,0608 D      Treatment Position Group Label
300A,0609 U      Treatment Position Group UID
300A,0611 Z      RT Accessory Holder Slot ID
300A,0615 Z      RT Accessory Device Slot ID
300A,0619 D      Radiation Dose Identification Label
300A,0623 D      Radiation Dose In-Vivo Measurement Label
300A,062A D      RT Tolerance Set Label
300A,0650 U      Patient Setup UID
300A,0676 X      Equipment Frame of Reference Description
300A,067C D      Radiation Generation Mode Label
300A,067D Z      Radiation Generation Mode Description
300A,0700 U      Treatment Session UID
300A,0734 D      Treatment Tolerance Violation Description
300A,0736 D      Treatment Tolerance Violation DateTime
300A,073A D      Recorded RT Control Point DateTime
300A,0741 D      Interlock DateTime
300A,0742 D      Interlock Description
300A,0760 D      Override DateTime
300A,0783 D      Interlock Origin Description
300C,0113 X      Reason for Omission Description
300E,0008 X/Z    Reviewer Name
3010,0006 U      Conceptual Volume UID
3010,000B U      Referenced Conceptual Volume UID
3010,000F Z      Conceptual Volume Combination Description
3010,0013 U      Constituent Conceptual Volume UID
3010,0015 U      Source Conceptual Volume UID
3010,0017 Z      Conceptual Volume Description
3010,001B Z      Device Alternate Identifier
3010,002D D      Device Label
3010,0031 U      Referenced Fiducials UID
3010,0033 D      User Content Label
3010,0034 D      User Content Long Label
3010,0035 D      Entity Label
3010,0036 X      Entity Name
3010,0037 X      Entity Description
3010,0038 D      Entity Long Label
3010,003B U      RT Treatment Phase UID
3010,0043 Z      Manufacturer's Device Identifier
3010,004C X/D    Intended Phase Start Date
3010,004D X/D    Intended Phase End Date
3010,0054 D      RT Prescription Label
3010,0056 X/D    RT Treatment Approach Label
3010,005A Z      RT Physician Intent Narrative
3010,005C Z      Reason for Superseding
3010,0061 X      Prior Treatment Dose Description
3010,006E U      Dosimetric Objective UID
3010,006F U      Referenced Dosimetric Objective UID
3010,0077 D      Treatment Site
3010,007A Z      Treatment Technique Notes
3010,007B Z      Prescription Notes
3010,007F Z      Fractionation Notes
3010,0081 Z      Prescription Notes Sequence
4000,0010 X      Arbitrary
4000,4000 X      Text Comments
4008,0042 X      Results ID Issuer
4008,0102 X      Interpretation Recorder
4008,010A X      Interpretation Transcriber
4008,010B X      Interpretation Text
4008,010C X      Interpretation Author
4008,0111 X      Interpretation Approver Sequence
4008,0114 X      Physician Approving Interpretation
4008,0115 X      Interpretation Diagnosis Description
4008,0118 X      Results Distribution List Sequence
4008,0119 X      Distribution Name
4008,011A X      Distribution Address
4008,0202 X      Interpretation ID Issuer
4008,0300 X      Impressions
4008,4000 X      Results Comments
50xx,xxxx X      Curve Data
60xx,3000 X      Overlay Data
60xx,4000 X      Overlay Comments
FFFA,FFFA X      Digital Signatures Sequence
FFFC,FFFC X      Data Set Trailing Padding
"""


@dataclass(frozen=True)
class E11Row:
    tag: str  # "0008,0050", or a repeating-group pattern such as "60xx,3000"
    code: str
    name: str

    @property
    def number(self) -> int:
        # A repeating group as its first instance; Curve Data as its data element.
        tag = self.tag.replace(",xxxx", ",3000").replace("xx", "00")
        return int(tag.replace(",", ""), 16)


E11 = [E11Row(*line.split(maxsplit=2)) for line in TABLE_E11.strip().splitlines()]
MARK_DATE, MARK_TIME, MARK_DATETIME = "19870623", "235917.123", "19870623235917"
FAMILY = "Doe"


# -- building and storing the test data -------------------------------------------------------


def identified(
    *,
    patient_id: str,
    patient_name: str,
    birth_date: str,
    age: str | None,
    study_uid: str,
    series_uid: str,
    study_date: str,
    instance_number: int,
    sop_class: str = CTImageStorage,
    burned_in: str | None = "NO",
) -> Dataset:
    """An instance carrying what real ones carry: names, IDs, dates, staff, institution,
    free-text descriptions naming the patient, a private group, nested identifying items."""
    ds = base_dataset(
        sop_class=sop_class,
        study_uid=study_uid,
        series_uid=series_uid,
        patient_id=patient_id,
        patient_name=patient_name,
        instance_number=instance_number,
    )
    family = patient_name.split("^")[0]
    ds.IssuerOfPatientID = "HOSPITAL-A"
    ds.PatientBirthDate = birth_date
    if age is not None:
        ds.PatientAge = age
    ds.PatientWeight = "71.5"
    ds.OtherPatientIDs = f"MRN-{patient_id}-99887766"
    ds.PatientAddress = "42 Wallaby Way, Sydney"
    ds.PatientTelephoneNumbers = "+61 2 5550 1234"
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date
    ds.StudyTime, ds.SeriesTime, ds.ContentTime = "101500", "101600", "101700"
    ds.AcquisitionDateTime = study_date + "101700.5"
    ds.InstanceCreationDate = study_date
    ds.AccessionNumber = f"A{patient_id}{study_date}"
    ds.InstitutionName = "St. Elsewhere General Hospital"
    ds.InstitutionAddress = "1 Main Street, Springfield"
    ds.ReferringPhysicianName = "House^Gregory"
    ds.PerformingPhysicianName = "Wilson^James"
    ds.OperatorsName = "Cuddy^Lisa"
    ds.StationName = "CTROOM3"
    ds.DeviceSerialNumber = "SN-4711"
    ds.StudyDescription = f"Chest CT {family} {patient_id} {study_date}"
    ds.SeriesDescription = "Axial 5mm"
    ds.ProtocolName = "Chest routine"
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid, "frame of reference"])
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    block = ds.private_block(0x0009, "ACME MEDICAL 1.0", create=True)
    block.add_new(0x10, "LO", f"private copy of {patient_id}")
    block.add_new(0x11, "DA", birth_date)
    request = Dataset()
    request.RequestedProcedureID = "RP-123456"
    request.ScheduledProcedureStepID = "SPS-98765"
    request.RequestedProcedureDescription = f"CT chest {family}"
    ds.RequestAttributesSequence = [request]
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "CTCH", "99LOCAL", "CT chest"
    code.InstitutionName = "St. Elsewhere General Hospital"  # identifying, nested
    code.OperatorsName = "Cuddy^Lisa"
    ds.ProcedureCodeSequence = [code]
    return ds


def _vr(tag: int) -> str:
    vr = dictionary_VR(tag)
    return vr.split(" or ")[0]


def marker(tag: int, vr: str, code: str, referenced: str) -> Any:
    """A value valid for the VR that can be recognised wherever it survives."""
    t = f"{tag:08X}"
    if vr == "SQ":
        item = Dataset()
        if "U*" in code:
            item.ReferencedSOPClassUID = CTImageStorage
            item.ReferencedSOPInstanceUID = referenced
        else:
            item.CodeValue = f"CV{t}"
            item.CodingSchemeDesignator = "99SECRET"
            item.CodeMeaning = f"Secret meaning {t}"
        return Sequence([item])
    values: dict[str, Any] = {
        "AE": f"AE{t}",
        "AS": "045Y",
        "CS": f"CS{t}",
        "DA": MARK_DATE,
        "DT": MARK_DATETIME,
        "TM": MARK_TIME,
        "DS": "73.5",
        "IS": "42",
        "PN": f"Secret{t}^Person",
        "UI": generate_uid(),
        "UR": f"http://secret.example/{t}",
        "AT": 0x00100010,
    }
    if vr in values:
        return values[vr]
    if vr in ("LO", "LT", "SH", "ST", "UT", "UC"):
        return f"SECRET{t}"
    if vr in ("US", "UL", "SS", "SL", "UV", "SV"):
        return 7
    if vr in ("FL", "FD"):
        return 7.5
    return b"SECRET!!"  # OB, OW, OD, OF, OL, OV, UN


def add_every_table_attribute(ds: Dataset, referenced_sop: str) -> list[str]:
    """Give `ds` every attribute of Table E.1-1 it does not have (except the command,
    File Meta and directory groups); return the recognisable string values put in."""
    markers = []
    for row in E11:
        tag = row.number
        if tag >> 16 in (0x0000, 0x0002, 0x0004) or Tag(tag) in ds:
            continue
        vr = _vr(tag)
        value = marker(tag, vr, row.code, referenced_sop)
        ds.add_new(tag, vr, value)
        if isinstance(value, str) and vr not in ("AS", "DS", "IS"):  # too short to find
            markers.append(value)
        elif vr == "SQ" and "U*" not in row.code:
            markers.append(f"Secret meaning {tag:08X}")
    return markers


def store(node: RunningNode, made: list[Made]) -> None:
    """C-STORE the files unchanged (pynetdicom sends the files' dataset bytes)."""
    ae = AE(ae_title="PYSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class, syntax in sorted({(m.sop_class_uid, m.transfer_syntax_uid) for m in made}):
        ae.add_requested_context(sop_class, syntax)
    saved = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
        assert assoc.is_established
        try:
            statuses = [int(assoc.send_c_store(m.path).Status) for m in made]
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = saved
    assert statuses == [0] * len(made)


@dataclass
class World:
    made: dict[int, Made]  # instance number -> what was stored
    sources: dict[int, Dataset]  # instance number -> the dataset as stored
    markers: list[str]  # recognisable values of the every-attribute instance
    sink: int  # instance number of the every-attribute instance
    burned_in: int  # instance number of the one flagged YES
    age_patients: dict[str, str]  # patient ID -> expected age band

    def of_patient(self, patient_id: str) -> list[int]:
        return [n for n, ds in self.sources.items() if ds.PatientID == patient_id]


AGES = {  # patient ID: (Patient's Age, birth date, study date, expected band)
    "AGE39": ("039Y", "19850101", "20240110", "30-39"),
    "AGE40": ("040Y", "19840101", "20240110", "40-49"),
    "AGE49": ("049Y", "19750101", "20240110", "40-49"),
    "AGE50": ("050Y", "19740101", "20240110", "50-59"),
    "AGE89": ("089Y", "19350101", "20240110", "80-89"),
    "AGE90": ("090Y", "19340101", "20240110", "90+"),
    "AGE95": ("095Y", "19290101", "20240110", "90+"),
    "AGE104": ("104Y", "19200101", "20240110", "90+"),
    "AGE6M": ("006M", "20230701", "20240110", "0-9"),
    # No Patient's Age: from the birth date, the day before the 40th birthday, and over 90.
    "NOAGE39": (None, "19840111", "20240110", "30-39"),
    "NOAGE94": (None, "19300101", "20240110", "90+"),
}


def build_world(folder: Path) -> World:
    made: dict[int, Made] = {}
    sources: dict[int, Dataset] = {}
    number = iter(range(1, 10_000))

    def add(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> int:
        n = int(ds.InstanceNumber)
        made[n] = write_instance(folder / f"{n:04d}.dcm", ds, syntax, rows=16, columns=16)
        sources[n] = dcmread(made[n].path)
        return n

    # Patient A: two studies; a CT series (2 + the every-attribute instance), an MR series, a
    # secondary capture with burned-in annotation in the second study.
    a = {"patient_id": "PIDA", "patient_name": f"{FAMILY}^Jane^Q", "birth_date": "19790310"}
    study1, study2 = generate_uid(), generate_uid()
    ct, mr, sc = generate_uid(), generate_uid(), generate_uid()
    first = add(
        identified(
            **a,
            age="045Y",
            study_uid=study1,
            series_uid=ct,
            study_date="20240115",
            instance_number=next(number),
        )
    )
    add(
        identified(
            **a,
            age="045Y",
            study_uid=study1,
            series_uid=ct,
            study_date="20240115",
            instance_number=next(number),
        ),
        ImplicitVRLittleEndian,
    )
    add(
        identified(
            **a,
            age="045Y",
            study_uid=study1,
            series_uid=mr,
            study_date="20240115",
            instance_number=next(number),
            sop_class=MRImageStorage,
        )
    )
    add(
        identified(
            **a,
            age="045Y",
            study_uid=study2,
            series_uid=generate_uid(entropy_srcs=[ct, "2"]),
            study_date="20240301",
            instance_number=next(number),
        )
    )
    burned = add(
        identified(
            **a,
            age="045Y",
            study_uid=study2,
            series_uid=sc,
            study_date="20240301",
            instance_number=next(number),
            sop_class=SecondaryCaptureImageStorage,
            burned_in="YES",
        )
    )
    sink_ds = identified(
        **a,
        age="045Y",
        study_uid=study1,
        series_uid=ct,
        study_date="20240115",
        instance_number=next(number),
    )
    markers = add_every_table_attribute(sink_ds, referenced_sop=made[first].sop_uid)
    sink_ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = made[first].sop_uid
    sink_ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 8)  # after the pixel data: the tail path
    sink = add(sink_ds)
    # Patient B, one study.
    add(
        identified(
            patient_id="PIDB",
            patient_name="Roe^Richard",
            birth_date="19600229",
            age="063Y",
            study_uid=generate_uid(),
            series_uid=generate_uid(),
            study_date="20240120",
            instance_number=next(number),
        )
    )
    for patient_id, (age, born, when, _band) in AGES.items():
        add(
            identified(
                patient_id=patient_id,
                patient_name=f"Age^{patient_id}",
                birth_date=born,
                age=age,
                study_uid=generate_uid(),
                series_uid=generate_uid(),
                study_date=when,
                instance_number=next(number),
            )
        )
    return World(
        made, sources, markers, sink, burned, {p: band for p, (_, _, _, band) in AGES.items()}
    )


# -- running the export -----------------------------------------------------------------------


@dataclass
class Ran:
    exit_code: int
    stdout: str
    stderr: str


def run_export(
    node: RunningNode, *args: str, key: str = KEY, env: dict[str, str] | None = None
) -> Ran:
    """The command in-process, as a script would call it."""
    root = logging_state()
    try:
        result = CliRunner().invoke(
            export_command,
            ["--data-dir", str(node.data_dir), *args],
            env={"PACS_NODE_PSEUDONYM_KEY": key, **(env or {})},
            catch_exceptions=False,
        )
    finally:
        restore_logging(root)
    return Ran(result.exit_code, result.stdout, result.stderr)


def logging_state() -> tuple[list, int]:
    import logging

    return list(logging.root.handlers), logging.root.level


def restore_logging(state: tuple[list, int]) -> None:
    import logging

    # The command points the root logger at its (captured, then closed) stderr.
    logging.root.handlers[:] = state[0]
    logging.root.setLevel(state[1])


@dataclass
class Exported:
    rows: list[dict[str, str]]  # manifest.jsonl
    by_number: dict[int, tuple[dict[str, str], Dataset, bytes]]  # instance number -> ...


def read_export(root: Path, export_id: str) -> Exported:
    base = root / export_id
    rows = [json.loads(line) for line in (base / "manifest.jsonl").read_text().splitlines()]
    with (base / "manifest.csv").open() as f:
        as_text = [{k: str(v) for k, v in r.items()} for r in rows]
        assert list(csv.DictReader(f)) == as_text  # the two manifests say the same
    by_number = {}
    for row in rows:
        data = (root / row["key"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert len(data) == int(row["size"])
        ds = dcmread(root / row["key"])
        by_number[int(ds.InstanceNumber)] = (row, ds, data)
    return Exported(rows, by_number)


def walk(ds: Dataset) -> list[Any]:
    """Every element of `ds`, sequence items included."""
    out = []
    for element in ds:
        out.append(element)
        if element.VR == "SQ":
            for item in element.value:
                out.extend(walk(item))
    return out


def leaf_strings(element: Any) -> set[str]:
    if element.VR == "SQ":
        return {
            s for item in element.value for e in walk(item) if e.VR != "SQ" for s in leaf_strings(e)
        }
    values = element.value if isinstance(element.value, list | tuple) else [element.value]
    return {str(v) for v in values if v not in (None, "", b"")}


def is_empty(element: Any) -> bool:
    return element.value in (None, "", b"") or (element.VR == "SQ" and len(element.value) == 0)


# -- the tests --------------------------------------------------------------------------------


def test_the_code_follows_the_same_table_e11() -> None:
    ours = {r.tag[1:-1]: r.basic for r in ROWS}
    assert ours == {r.tag: r.code for r in E11}
    assert len(E11) == 459


def test_default_profile_is_complete_and_a_lax_profile_is_refused(tmp_path: Path) -> None:
    from pacs_node.export.profile import ProfileError, load_profile

    shipped = load_profile()
    assert (Path(__file__).parents[1] / "pacs_node/export/default_profile.toml").read_text() == (
        render_profile()
    ), "default_profile.toml is generated by render_profile(); regenerate it"
    assert {r.action for r in shipped.rules.values()} >= {"P", "B", "C", "U", "X", "Z", "D"}
    lax = render_profile().replace(
        '"(0008,0080)" = { action = "D"', '"(0008,0080)" = { action = "K"'
    )
    with pytest.raises(ProfileError, match="Institution Name"):
        parse_profile(lax)
    declared = lax.replace(
        'action = "K", basic = "X/Z/D", name = "Institution Name"',
        'action = "K", basic = "X/Z/D", name = "Institution Name", '
        'deviation = "single-site study, institution known to recipients"',
    )
    assert [r.tag for r in parse_profile(declared).deviations] == ["(0008,0080)"]
    missing = "\n".join(
        line for line in render_profile().splitlines() if not line.startswith('"(0010,0030)"')
    )
    with pytest.raises(ProfileError, match="Birth Date"):
        parse_profile(missing)


def test_basic_profile_attribute_by_attribute_and_research_options(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    world = build_world(tmp_path / "in")
    node = start_node()
    store(node, list(world.made.values()))
    basic_profile = tmp_path / "basic.toml"
    basic_profile.write_text(render_profile((), name="basic-only"))
    out = tmp_path / "out"

    ran = run_export(
        node, "--all", "--to", str(out), "--profile", str(basic_profile), "--export-id", "basic"
    )
    assert ran.exit_code == 0, ran.stderr + ran.stdout
    basic = read_export(out, "basic")

    # 1. The every-attribute instance, row by row against Table E.1-1.
    before = world.sources[world.sink]
    row, after, data = basic.by_number[world.sink]
    checked = 0
    for e11 in E11:
        if e11.tag.startswith(("0000", "0002", "0004")):
            continue
        original = before.get(Tag(e11.number))
        assert original is not None, f"the test instance lacks {e11.tag} {e11.name}"
        new = after.get(Tag(e11.number))
        what = f"{e11.tag} {e11.name} ({e11.code})"
        if e11.code == "X":
            assert new is None, what
        elif e11.code == "U":
            assert new is not None and not is_empty(new), what
            assert leaf_strings(new).isdisjoint(leaf_strings(original)), what
            assert all(str(v).startswith("2.25.") for v in leaf_strings(new)), what
        elif e11.code == "X/Z/U*":
            if new is not None and not is_empty(new):
                old_uids = {e.value for item in original.value for e in walk(item) if e.VR == "UI"}
                new_uids = {e.value for item in new.value for e in walk(item) if e.VR == "UI"}
                assert {v for v in old_uids if v != CTImageStorage}.isdisjoint(new_uids), what
        else:  # D, Z, Z/D, X/Z, X/D, X/Z/D
            if new is None:
                assert e11.code.startswith("X"), f"{what}: removed"
            elif is_empty(new):
                assert "Z" in e11.code, f"{what}: emptied"
            else:
                assert "D" in e11.code or e11.code == "Z", f"{what}: has a value"
                assert leaf_strings(new).isdisjoint(leaf_strings(original)), what
        checked += 1
    assert checked >= 440
    for value in world.markers:  # nothing recognisable survives anywhere in the file
        assert value.encode() not in data, value
    for value in (
        MARK_DATE,
        "PIDA",
        FAMILY,
        "House",
        "Elsewhere",
        before.SOPInstanceUID,
        before.StudyInstanceUID,
        before.SeriesInstanceUID,
        "19790310",
    ):
        assert value.encode() not in data, value
    assert after.file_meta.MediaStorageSOPInstanceUID == after.SOPInstanceUID
    assert after.SOPInstanceUID != before.SOPInstanceUID
    assert not any(e.tag.is_private for e in walk(after))
    assert after.PatientIdentityRemoved == "YES"
    assert [i.CodeValue for i in after.DeidentificationMethodCodeSequence] == ["113100"]
    assert after.LongitudinalTemporalInformationModified == "REMOVED"
    assert Tag(0xFFFCFFFC) not in after  # the tail after the pixel data was processed too
    assert after.PixelData == before.PixelData

    # 2. The research profile: pseudonyms, shifted dates, age bands, cleaned descriptions.
    ran = run_export(node, "--all", "--to", str(out), "--export-id", "research")
    assert ran.exit_code == 0, ran.stderr + ran.stdout
    research = read_export(out, "research")
    assert world.burned_in not in research.by_number
    assert len(research.rows) == len(world.made) - 1

    patient_a = world.of_patient("PIDA")
    pseudonyms = {research.by_number[n][1].PatientID for n in patient_a if n != world.burned_in}
    assert len(pseudonyms) == 1
    (pseudonym,) = pseudonyms
    assert (
        "PIDA" not in pseudonym
        and pseudonym != research.by_number[world.of_patient("PIDB")[0]][1].PatientID
    )

    shifts = set()
    for n in patient_a:
        if n == world.burned_in:
            continue
        src, (row, ds, data) = world.sources[n], research.by_number[n]
        assert ds.PatientName == ds.PatientID == pseudonym == row["patient"]
        for keyword in (
            "StudyDate",
            "SeriesDate",
            "AcquisitionDate",
            "ContentDate",
            "InstanceCreationDate",
        ):
            old = date.fromisoformat(_iso(getattr(src, keyword)))
            new = date.fromisoformat(_iso(getattr(ds, keyword)))
            shifts.add((new - old).days)
        assert ds.AcquisitionDateTime[8:] == src.AcquisitionDateTime[8:]  # time of day kept
        assert ds.StudyTime == src.StudyTime
        assert row["study_date"] == ds.StudyDate
        assert ds.PatientBirthDate == ""
        assert ds.PatientSex == "F" and ds.PatientWeight == src.PatientWeight  # characteristics
        assert row["age_band"] == "40-49" and ds.PatientAge == "040Y"
        assert ds.AccessionNumber == "" and "OtherPatientIDs" not in ds
        assert "PatientAddress" not in ds and "PerformingPhysicianName" not in ds
        assert ds.InstitutionName == "DEIDENTIFIED" and ds.OperatorsName == "DEIDENTIFIED"
        assert ds.StudyDescription == "Chest CT"  # name, ID and date cleaned out
        assert ds.ProtocolName == "Chest routine"  # nothing identifying in it: kept
        request = ds.RequestAttributesSequence[0]
        assert "RequestedProcedureID" not in request and "ScheduledProcedureStepID" not in request
        assert request.RequestedProcedureDescription == "CT chest"
        nested = ds.ProcedureCodeSequence[0]
        assert nested.CodeValue == "CTCH" and nested.InstitutionName == "DEIDENTIFIED"
        assert nested.OperatorsName == "DEIDENTIFIED"
        assert not any(e.tag.is_private for e in walk(ds))
        assert [i.CodeValue for i in ds.DeidentificationMethodCodeSequence] == [
            "113100",
            "113107",
            "113105",
            "113108",
        ]
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        for value in ("PIDA", "Jane", "19790310", "House", "Wilson", "Elsewhere", "SN-4711"):
            assert value.encode() not in data, value
    assert len(shifts) == 1, f"one shift for the patient's every date, got {shifts}"
    (shift,) = shifts
    assert -1095 <= shift <= -30

    # UIDs: the same original, the same new one; the hierarchy as it was.
    def new_uids(keyword: str) -> dict[str, set[str]]:
        mapping: dict[str, set[str]] = {}
        for n, (_row, ds, _) in research.by_number.items():
            mapping.setdefault(str(getattr(world.sources[n], keyword)), set()).add(
                str(getattr(ds, keyword))
            )
        return mapping

    for keyword in (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "FrameOfReferenceUID",
    ):
        mapping = new_uids(keyword)
        assert all(len(v) == 1 for v in mapping.values()), keyword
        assert len({next(iter(v)) for v in mapping.values()}) == len(mapping), keyword
        assert not set(mapping) & {next(iter(v)) for v in mapping.values()}, keyword
    for row, ds, _ in research.by_number.values():
        assert row["key"] == (
            f"research/instances/{ds.PatientID}/{ds.StudyInstanceUID}/"
            f"{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
        )
        assert (row["study_uid"], row["series_uid"], row["sop_uid"]) == (
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
            ds.SOPInstanceUID,
        )
    first_ct = min(world.of_patient("PIDA"))
    sink = research.by_number[world.sink][1]
    assert (
        sink.ReferencedImageSequence[0].ReferencedSOPInstanceUID
        == research.by_number[first_ct][1].SOPInstanceUID
    )
    assert sink.StudyInstanceUID == research.by_number[first_ct][1].StudyInstanceUID

    # Age bands at the edges, and over 90 top-coded.
    for patient_id, band in world.age_patients.items():
        (n,) = world.of_patient(patient_id)
        row, ds, _ = research.by_number[n]
        assert row["age_band"] == band, patient_id
        lower = band.rstrip("+").split("-")[0]
        assert ds.PatientAge == f"{int(lower):03d}Y", patient_id

    # The README and the audit say what was done; the mapping stays on the node, encrypted.
    readme = (out / "research" / "README.md").read_text()
    assert "RetainLongitudinalTemporalInformationModifiedDates" in readme
    assert "1 skipped: burned in annotation" in readme
    assert "PIDA" not in readme and "Doe" not in readme
    events = [r for r in read_audit(node.config.audit.path) if r["event"].startswith("export_")]
    done = [r for r in events if r["event"] == "export_completed"]
    assert [r["export_id"] for r in done] == ["basic", "research"]
    assert done[1]["instances"] == len(world.made) - 1
    assert done[1]["skipped"] == {"burned_in_annotation": 1}
    assert "PIDA" not in json.dumps(events) and "Doe" not in json.dumps(events)
    assert events[0]["user"] and events[0]["profile"] == "basic-only"
    assert not list(out.rglob("*mapping*"))
    mapping = read_mapping(
        node.data_dir / "exports" / "research" / "mapping.jsonl.enc", KEY.encode(), "research"
    )
    patients = {m["original"]: m["pseudonymous"] for m in mapping if m["kind"] == "patient"}
    assert patients["HOSPITAL-A\\PIDA"] == pseudonym
    assert (
        b"PIDA" not in (node.data_dir / "exports" / "research" / "mapping.jsonl.enc").read_bytes()
    )


def _iso(da: str) -> str:
    return f"{da[:4]}-{da[4:6]}-{da[6:8]}"


def test_same_patient_same_pseudonym_per_project_key(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    world = build_world(tmp_path / "in")
    node = start_node()
    store(node, [world.made[n] for n in world.of_patient("PIDA") + world.of_patient("PIDB")])
    out = tmp_path / "out"
    assert run_export(node, "--all", "--to", str(out), "--export-id", "one").exit_code == 0
    # Another export of the same project: only patient A's CT series, another id.
    ran = run_export(
        node,
        "--patient-id",
        "PIDA",
        "--modality",
        "CT",
        "--date-range",
        "20240101-20240131",
        "--to",
        str(out),
        "--export-id",
        "two",
    )
    assert ran.exit_code == 0, ran.stderr + ran.stdout
    # The same data under another project's key.
    ran = run_export(node, "--all", "--to", str(out), "--export-id", "other", key=OTHER_KEY)
    assert ran.exit_code == 0, ran.stderr + ran.stdout
    one, two, other = (read_export(out, e) for e in ("one", "two", "other"))

    assert {ds.Modality for _, ds, _ in two.by_number.values()} == {"CT"}
    assert set(two.by_number) < set(one.by_number)
    for n, (_, ds, _) in two.by_number.items():
        first = one.by_number[n][1]
        assert ds.PatientID == first.PatientID  # same key: same pseudonym
        assert ds.StudyInstanceUID == first.StudyInstanceUID
        assert ds.SOPInstanceUID == first.SOPInstanceUID
        assert ds.StudyDate == first.StudyDate  # the same shift
    for n, (_, ds, _) in other.by_number.items():
        first = one.by_number[n][1]
        assert ds.PatientID != first.PatientID  # another key: another pseudonym
        assert ds.StudyInstanceUID != first.StudyInstanceUID
    a = {one.by_number[n][1].PatientID for n in world.of_patient("PIDA") if n in one.by_number}
    b = {one.by_number[n][1].PatientID for n in world.of_patient("PIDB")}
    assert len(a) == len(b) == 1 and a != b
    for path in out.rglob("*"):
        if path.is_file():
            for value in (b"PIDA", b"PIDB", b"Doe", b"Roe", b"19790310"):
                assert value not in path.read_bytes(), (path, value)


def fill_many(node: RunningNode, folder: Path, count: int) -> list[Made]:
    made = []
    studies = [generate_uid() for _ in range(4)]
    for i in range(count):
        ds = identified(
            patient_id=f"PID{i % 4}",
            patient_name=f"Many^Patient{i % 4}",
            birth_date="19700101",
            age="054Y",
            study_uid=studies[i % 4],
            series_uid=generate_uid(entropy_srcs=[studies[i % 4]]),
            study_date="20240201",
            instance_number=i + 1,
        )
        made.append(write_instance(folder / f"{i:05d}.dcm", ds, rows=64, columns=64))
    store(node, made)
    return made


def test_killed_export_resumes_without_duplicates_or_losses(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    count = 240
    node = start_node()
    made = fill_many(node, tmp_path / "in", count)
    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "pacs_node.export",
        "--data-dir",
        str(node.data_dir),
        "--all",
        "--to",
        str(out),
        "--export-id",
        "crash",
    ]
    env = {**os.environ, "PACS_NODE_PSEUDONYM_KEY": KEY}
    instances = out / "crash" / "instances"
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if instances.exists() and sum(1 for _ in instances.rglob("*.dcm")) >= 30:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    before = sum(1 for _ in instances.rglob("*.dcm"))
    assert 30 <= before < count, f"killed too late: {before} objects"
    assert not (out / "crash" / "manifest.csv").exists()

    resumed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert "(resumed)" in resumed.stdout
    exported = read_export(out, "crash")
    assert sorted(exported.by_number) == list(range(1, count + 1))  # none lost, none twice
    assert len(exported.rows) == count
    assert len({r["sop_uid"] for r in exported.rows}) == count
    files = sorted(p for p in (out / "crash").rglob("*") if p.is_file())
    assert len([p for p in files if p.suffix == ".dcm"]) == count  # no duplicate objects
    assert [p.name for p in files if p.suffix != ".dcm"] == [
        "README.md",
        "manifest.csv",
        "manifest.jsonl",
    ]  # no temporary file left behind
    for row, ds, _ in exported.by_number.values():
        assert Path(row["key"]).stem == ds.SOPInstanceUID
    journal = (node.data_dir / "exports" / "crash" / "journal.jsonl").read_text().splitlines()
    assert len({json.loads(line)["src"] for line in journal}) == count
    mapping = read_mapping(
        node.data_dir / "exports" / "crash" / "mapping.jsonl.enc", KEY.encode(), "crash"
    )
    sop_map = {m["original"]: m["pseudonymous"] for m in mapping if m["kind"] == "uid"}
    assert {sop_map[m.sop_uid] for m in made} == {r["sop_uid"] for r in exported.rows}
    events = [r for r in read_audit(node.config.audit.path) if r["event"].startswith("export_")]
    assert [(r["event"], r.get("resumed")) for r in events] == [
        ("export_started", False),
        ("export_started", True),
        ("export_completed", None),
    ]
    assert 0 < events[1]["already_done"] < count
    assert events[2]["instances"] == count


def test_manifest_links_download_the_objects_from_s3(
    start_node: Callable[..., RunningNode],
    tmp_path: Path,
    s3_server: MotoServer,
    bucket: str,
) -> None:
    world = build_world(tmp_path / "in")
    node = start_node()
    store(node, [world.made[n] for n in world.of_patient("PIDA") + world.of_patient("PIDB")])
    # The export bucket's own credentials (moto takes any).
    own = {
        "PACS_NODE_EXPORT_AWS_ACCESS_KEY_ID": "export-writer",
        "PACS_NODE_EXPORT_AWS_SECRET_ACCESS_KEY": "export-secret",
    }
    ran = run_export(
        node,
        "--all",
        "--to",
        f"s3://{bucket}/project-alpha",
        "--endpoint-url",
        s3_server.endpoint_url,
        "--allow-plain-http",
        "--region",
        "us-east-1",
        "--addressing-style",
        "path",
        "--links",
        "presigned",
        "--link-expiry",
        "1h",
        "--export-id",
        "s3export",
        env=own,
    )
    assert ran.exit_code == 0, ran.stderr + ran.stdout
    client = s3_server.client()
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    manifest = client.get_object(Bucket=bucket, Key="project-alpha/s3export/manifest.jsonl")
    rows = [json.loads(line) for line in manifest["Body"].read().decode().splitlines()]
    assert len(rows) == len(world.of_patient("PIDA")) + len(world.of_patient("PIDB")) - 1
    assert keys == {r["key"] for r in rows} | {
        f"project-alpha/s3export/{n}" for n in ("manifest.csv", "manifest.jsonl", "README.md")
    }
    for row in rows:
        assert row["link"].startswith(s3_server.endpoint_url) and "Signature" in row["link"]
        with urllib.request.urlopen(row["link"], timeout=10) as response:
            data = response.read()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        ds = dcmread(io.BytesIO(data))
        assert ds.SOPInstanceUID == row["sop_uid"] and ds.PatientID == row["patient"]
        assert row["key"].startswith(f"project-alpha/s3export/instances/{row['patient']}/")
        assert row["modality"] == ds.Modality and row["age_band"]
    csv_text = (
        client.get_object(Bucket=bucket, Key="project-alpha/s3export/manifest.csv")["Body"]
        .read()
        .decode()
    )
    assert [r["sop_uid"] for r in csv.DictReader(csv_text.splitlines())] == [
        r["sop_uid"] for r in rows
    ]


def test_never_exports_to_the_clinical_bucket_or_the_node_data(
    start_node: Callable[..., RunningNode], tmp_path: Path, s3_server: MotoServer, bucket: str
) -> None:
    node = start_node()
    config = tmp_path / "node.toml"
    config.write_text(
        f'data_dir = "{node.data_dir}"\n[replication]\ntarget = "s3"\nbucket = "{bucket}"\n'
        f'endpoint_url = "{s3_server.endpoint_url}"\nallow_plain_http = true\n'
    )
    ran = run_export(
        node,
        "--config",
        str(config),
        "--all",
        "--to",
        f"s3://{bucket}/x",
        "--endpoint-url",
        s3_server.endpoint_url,
        "--allow-plain-http",
    )
    assert ran.exit_code == 2 and "clinical replication bucket" in ran.stderr
    ran = run_export(
        node, "--all", "--to", f"s3://{bucket}/x", "--endpoint-url", s3_server.endpoint_url
    )
    assert ran.exit_code == 2 and "plain HTTP" in ran.stderr
    ran = run_export(node, "--all", "--to", str(node.data_dir / "exports-here"))
    assert ran.exit_code == 2 and "node's own data" in ran.stderr
    ran = run_export(node, "--all", "--to", str(tmp_path / "x"), key="short")
    assert ran.exit_code == 2 and "PACS_NODE_PSEUDONYM_KEY" in ran.stderr
    ran = run_export(node, "--to", str(tmp_path / "x"))
    assert ran.exit_code == 2 and "nothing selected" in ran.stderr


def test_pixel_data_unchanged_and_burned_in_annotation_skipped(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    node = start_node()
    made = []
    syntaxes = [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGLSLossless,
    ]
    study = generate_uid()
    for i, syntax in enumerate(syntaxes, 1):
        ds = identified(
            patient_id="PIXEL",
            patient_name="Pixel^Paul",
            birth_date="19800101",
            age="044Y",
            study_uid=study,
            series_uid=generate_uid(entropy_srcs=[study, str(i)]),
            study_date="20240105",
            instance_number=i,
        )
        made.append(write_instance(tmp_path / f"{i}.dcm", ds, syntax, rows=128, columns=96))
    flagged = identified(
        patient_id="PIXEL",
        patient_name="Pixel^Paul",
        birth_date="19800101",
        age="044Y",
        study_uid=study,
        series_uid=generate_uid(entropy_srcs=[study, "9"]),
        study_date="20240105",
        instance_number=9,
        sop_class=SecondaryCaptureImageStorage,
        burned_in="YES",
    )
    made.append(write_instance(tmp_path / "9.dcm", flagged, ExplicitVRLittleEndian))
    store(node, made)
    out = tmp_path / "out"
    ran = run_export(node, "--patient-id", "PIXEL", "--to", str(out), "--export-id", "pixels")
    assert ran.exit_code == 0, ran.stderr + ran.stdout
    assert f"skipped (burned in annotation): {made[-1].sop_uid}" in ran.stdout
    exported = read_export(out, "pixels")
    assert sorted(exported.by_number) == [1, 2, 3, 4, 5]
    for m in made[:-1]:
        source = dcmread(m.path)
        row, ds, _ = exported.by_number[int(source.InstanceNumber)]
        assert ds.file_meta.TransferSyntaxUID == m.transfer_syntax_uid
        assert ds.PixelData == source.PixelData, m.transfer_syntax_uid  # byte for byte
        assert ds["PixelData"].VR == source["PixelData"].VR
        assert (ds.Rows, ds.Columns, ds.BitsStored) == (source.Rows, source.Columns, 12)
        assert row["burned_in_annotation"] == "NO"
    (completed,) = [
        r for r in read_audit(node.config.audit.path) if r["event"] == "export_completed"
    ]
    assert completed["skipped_sop_uids"] == {"burned_in_annotation": [made[-1].sop_uid]}
    assert "1 skipped: burned in annotation" in (out / "pixels" / "README.md").read_text()


def _replicated(db_path: Path) -> int:
    import sqlite3

    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return db.execute(
            "SELECT COUNT(*) FROM instance WHERE replicated_at IS NOT NULL"
        ).fetchone()[0]
    finally:
        db.close()


def _evict(node: RunningNode, sop_uid: str) -> None:
    """What cache eviction leaves behind: the row without a cache path, the file gone."""
    import sqlite3

    db = sqlite3.connect(node.config.index.path)
    try:
        (relative,) = db.execute(
            "SELECT cache_path FROM instance WHERE sop_uid = ?", (sop_uid,)
        ).fetchone()
        db.execute("UPDATE instance SET cache_path = NULL WHERE sop_uid = ?", (sop_uid,))
        db.commit()
    finally:
        db.close()
    (node.config.storage.cache_dir / relative).unlink()


def test_evicted_instance_is_read_from_the_clinical_copy(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    replication = {
        "target": "directory",
        "directory": str(tmp_path / "dr"),
        "defer_while_ingesting_s": 0,
        "retry_base_s": 0.05,
    }
    (tmp_path / "dr").mkdir()
    node = start_node(replication=replication)
    made = fill_many(node, tmp_path / "in", 3)
    deadline = time.monotonic() + 30
    while _replicated(node.config.index.path) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _replicated(node.config.index.path) == 3
    _evict(node, made[1].sop_uid)
    config = tmp_path / "node.toml"
    config.write_text(
        f'data_dir = "{node.data_dir}"\n[replication]\ntarget = "directory"\n'
        f'directory = "{tmp_path / "dr"}"\n'
    )
    out = tmp_path / "out"
    ran = run_export(node, "--config", str(config), "--all", "--to", str(out), "--export-id", "e")
    assert ran.exit_code == 0, ran.stderr + ran.stdout
    exported = read_export(out, "e")
    assert sorted(exported.by_number) == [1, 2, 3]
    assert exported.by_number[2][1].PixelData == dcmread(made[1].path).PixelData
    assert not list((node.data_dir / "exports" / "e" / "work").iterdir())  # download removed

    # Without the clinical copy's location, the evicted instance is reported, not lost.
    ran = run_export(node, "--all", "--to", str(out), "--export-id", "f")
    assert ran.exit_code == 1
    assert f"UNAVAILABLE (no readable copy; retried on the next run): {made[1].sop_uid}" in (
        ran.stdout
    )


def test_a_large_instance_is_exported_in_bounded_memory(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    import psutil

    from tests.factory import write_large_instance

    node = start_node()
    big = write_large_instance(tmp_path / "big.dcm", 160 * 1024 * 1024)
    store(node, [big])
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pacs_node.export",
            "--data-dir",
            str(node.data_dir),
            "--all",
            "--to",
            str(out),
            "--export-id",
            "big",
        ],
        env={**os.environ, "PACS_NODE_PSEUDONYM_KEY": KEY},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    peak = 0
    watched = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.01)
    assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
    (row,) = read_export_rows(out, "big")
    assert int(row["size"]) > 160 * 1024 * 1024
    assert peak < 140 * 1024 * 1024, f"peak RSS {peak / 2**20:.0f} MiB for a 160-MiB instance"
    with (out / row["key"]).open("rb") as exported, big.path.open("rb") as source:
        exported.seek(-(1 << 20), os.SEEK_END)
        source.seek(-(1 << 20), os.SEEK_END)
        assert exported.read() == source.read()  # the end of the pixel data, unchanged


def read_export_rows(root: Path, export_id: str) -> list[dict[str, Any]]:
    return [
        json.loads(line) for line in (root / export_id / "manifest.jsonl").read_text().splitlines()
    ]


def test_private_attributes_kept_only_when_listed_by_creator(tmp_path: Path) -> None:
    from pacs_node.export.deidentify import Deidentifier, Keyring
    from pacs_node.export.state import StateError, open_state

    keep = (
        'keep = [{ creator = "ACME 1.0", group = "0029", element = "xx10", '
        'reason = "slice spacing, a number" }]'
    )
    profile = parse_profile(render_profile().replace("keep = []", keep))
    ds = base_dataset()
    acme = ds.private_block(0x0029, "ACME 1.0", create=True)
    acme.add_new(0x10, "DS", "1.5")
    acme.add_new(0x11, "LO", "operator Cuddy")
    ds.private_block(0x0029, "OTHER 2.0", create=True).add_new(0x10, "LO", "PID001")
    ds.private_block(0x0031, "ACME 1.0", create=True).add_new(0x10, "LO", "PID001")
    Deidentifier(profile, Keyring(KEY.encode())).apply(ds)
    kept = [(e.tag, e.value) for e in ds if e.tag.is_private]
    assert kept == [(0x00290010, "ACME 1.0"), (0x00291010, "1.5")]  # creator, listed element
    assert "113111" in [i.CodeValue for i in ds.DeidentificationMethodCodeSequence]

    # One export runs at a time: a second process on the same export id is refused.
    state = open_state(tmp_path, "locked", {"selection": "x"}, None)
    try:
        with pytest.raises(StateError, match="running in another process"):
            open_state(tmp_path, "locked", {"selection": "x"}, None)
    finally:
        state.close()
    open_state(tmp_path, "locked", {"selection": "x"}, None).close()
    with pytest.raises(StateError, match="another selection"):
        open_state(tmp_path, "locked", {"selection": "y"}, None)
