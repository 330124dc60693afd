#!/usr/bin/python3
"""Sandbox EHR: a simulated Epic-style FHIR R4 server used as ehrgate's upstream.

It is the only simulated component of the ehrgate test setup: integration
tests, demos (`./build.sh run`) and the redaction / consent / auth tests all
put the real gateway in front of it.  Every record it serves is synthetic and
generated deterministically from --seed, so the same seed always yields
byte-identical data.

Run with Debian's interpreter (standard library only):

    /usr/bin/python3 tests/sandbox_ehr/sandbox_ehr.py --host 127.0.0.1 --port 8090

Once listening it prints exactly one line, `SANDBOX_EHR READY port=<port>`, on
stdout; tests wait for it.  SIGTERM and SIGINT exit cleanly with status 0.
See docs/sandbox-ehr.md for endpoints and the table of documented fixtures.
"""

import argparse
import collections
import gzip
import json
import random
import re
import signal
import socket
import string
import sys
import threading
import time
import traceback
import zlib
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

FHIR_JSON = "application/fhir+json; charset=utf-8"
PLAIN_JSON = "application/json; charset=utf-8"

# All generated dates are relative to this fixed "now" so data never drifts.
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)

PATIENT_COUNT = 36
# Ids of the first two patients; tests, demos and docs rely on them.
STABLE_PATIENT_IDS = ("erXuFYUfucBZaryVksYEcMg3", "eq081-VQEgP8drUUqCWzHfw3")

DEFAULT_COUNT = 20
MAX_COUNT = 200
MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_SLOW_MS = 120_000
RECENT_REQUESTS = 200

BULK_PARAM = "_sandbox_bulk_mb"
BULK_MAX_MB = 200
# Every bulk entry is padded to exactly this many bytes so the entry count (and
# so Bundle.total) is known before streaming starts.
BULK_ENTRY_BYTES = 2048
STREAM_CHUNK_BYTES = 64 * 1024
# Ordinary responses use a typical server compression level; the bulk stream
# uses the fastest one so load tests measure the gateway, not this process.
GZIP_LEVEL = 6
BULK_GZIP_LEVEL = 1

FHIR_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
HOST_HEADER_RE = re.compile(r"^(?:[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$")
DATE_PARAM_RE = re.compile(
    r"^(eq|ne|gt|lt|ge|le)?"
    r"(\d{4}(?:-\d{2}(?:-\d{2}(?:T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2})?)?)?)?)$")

SYS_CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
SYS_ACTCODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
SYS_MRN = "urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14"
SYS_SSN = "http://hl7.org/fhir/sid/us-ssn"
SYS_NPI = "http://hl7.org/fhir/sid/us-npi"
SYS_LOINC = "http://loinc.org"
SYS_SNOMED = "http://snomed.info/sct"
SYS_ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
SYS_RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SYS_UCUM = "http://unitsofmeasure.org"
SYS_V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
SYS_OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
SYS_COND_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
SYS_COND_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
SYS_COND_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
SYS_MEDREQ_CATEGORY = "http://terminology.hl7.org/CodeSystem/medicationrequest-category"
SYS_CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"

# meta.security codes used by the fixtures: code -> (system, display).
SECURITY_LABELS = {
    "N": (SYS_CONFIDENTIALITY, "normal"),
    "R": (SYS_CONFIDENTIALITY, "restricted"),
    "PSY": (SYS_ACTCODE, "psychiatry information sensitivity"),
    "ETH": (SYS_ACTCODE, "substance abuse information sensitivity"),
    "SUD": (SYS_ACTCODE, "substance use disorder information sensitivity"),
    "HIV": (SYS_ACTCODE, "HIV/AIDS information sensitivity"),
    "SEX": (SYS_ACTCODE, "sexuality and reproductive health information sensitivity"),
}

# --------------------------------------------------------------------------
# Clinical vocabulary used by the generator (codes are real, data is not)
# --------------------------------------------------------------------------

GIVEN_FEMALE = ["Amara", "Beatrix", "Celeste", "Dalia", "Elin", "Freya", "Greta", "Hana",
                "Ines", "Juno", "Kalani", "Liora", "Maren", "Noor", "Odile", "Priya"]
GIVEN_MALE = ["Anders", "Bastian", "Cyrus", "Dario", "Emeka", "Florian", "Gideon", "Hiro",
              "Idris", "Jonah", "Kasper", "Lucian", "Matteo", "Nikolai", "Osric", "Pavel"]
FAMILY_NAMES = ["Albright", "Brennan", "Castellano", "Dunmore", "Ekwueme", "Fairweather",
                "Galloway", "Haverford", "Ishikawa", "Jaramillo", "Kowalczyk", "Lindqvist",
                "Marchetti", "Nakagawa", "Oyelaran", "Pemberton", "Quintero", "Rasmussen"]
STREETS = ["Alder Lane", "Birchwood Drive", "Cedar Court", "Dogwood Avenue", "Elm Street",
           "Foxglove Way", "Granite Road", "Heron Place"]
CITIES = [("Madison", "WI", "537"), ("Verona", "WI", "535"), ("Middleton", "WI", "535"),
          ("Fitchburg", "WI", "537"), ("Sun Prairie", "WI", "535")]

# (code, display, UCUM unit, low, high, decimals)
LABS = [
    ("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL", 70, 140, 0),
    ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", 0.6, 1.3, 2),
    ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 11.0, 17.0, 1),
    ("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL", 4.0, 11.0, 1),
    ("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L", 135, 145, 0),
    ("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L", 3.5, 5.1, 1),
    ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", 4.8, 9.0, 1),
    ("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL", 140, 260, 0),
]
VITALS = [
    ("8867-4", "Heart rate", "/min", 55, 105, 0),
    ("8310-5", "Body temperature", "Cel", 36.2, 38.4, 1),
    ("29463-7", "Body weight", "kg", 48.0, 118.0, 1),
    ("9279-1", "Respiratory rate", "/min", 12, 22, 0),
]

# (class code, class display, SNOMED type code, type display, min hours, max hours, weight)
ENCOUNTER_KINDS = [
    ("AMB", "ambulatory", "185349003", "Encounter for check up (procedure)", 0.5, 1.5, 7),
    ("EMER", "emergency", "50849002", "Emergency room admission (procedure)", 2, 9, 2),
    ("IMP", "inpatient encounter", "32485007", "Hospital admission (procedure)", 24, 144, 1),
]

# Long-standing problems: (ICD-10-CM, display, SNOMED, display, RxNorm med or None)
CHRONIC_CONDITIONS = [
    ("I10", "Essential (primary) hypertension", "59621000", "Essential hypertension",
     ("314076", "lisinopril 10 MG Oral Tablet", "Take 1 tablet by mouth daily")),
    ("E11.9", "Type 2 diabetes mellitus without complications", "44054006",
     "Diabetes mellitus type 2",
     ("860975", "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet",
      "Take 1 tablet by mouth daily with evening meal")),
    ("E78.5", "Hyperlipidemia, unspecified", "55822004", "Hyperlipidemia",
     ("259255", "atorvastatin 80 MG Oral Tablet", "Take 1 tablet by mouth at bedtime")),
    ("J45.909", "Unspecified asthma, uncomplicated", "195967001", "Asthma",
     ("895994", "120 ACTUAT fluticasone propionate 0.044 MG/ACTUAT Metered Dose Inhaler",
      "Inhale 2 puffs twice daily")),
    ("E03.9", "Hypothyroidism, unspecified", "40930008", "Hypothyroidism",
     ("966222", "levothyroxine sodium 0.075 MG Oral Tablet",
      "Take 1 tablet by mouth every morning")),
    ("M54.50", "Low back pain, unspecified", "279039007", "Low back pain",
     ("310965", "ibuprofen 200 MG Oral Tablet", "Take 2 tablets by mouth every 6 hours as needed")),
    ("K21.9", "Gastro-esophageal reflux disease without esophagitis", "235595009",
     "Gastroesophageal reflux disease", None),
]
ACUTE_CONDITIONS = [
    ("J06.9", "Acute upper respiratory infection, unspecified", "54150009",
     "Upper respiratory infection",
     ("313782", "acetaminophen 325 MG Oral Tablet", "Take 2 tablets by mouth every 6 hours as needed")),
    ("J02.0", "Streptococcal pharyngitis", "43878008", "Streptococcal sore throat",
     ("308182", "amoxicillin 250 MG Oral Capsule", "Take 1 capsule by mouth 3 times daily for 10 days")),
]
# (category SNOMED code, category display, code system, code, display)
SERVICE_ORDERS = [
    ("108252007", "Laboratory procedure", SYS_LOINC, "24323-8",
     "Comprehensive metabolic 2000 panel - Serum or Plasma"),
    ("108252007", "Laboratory procedure", SYS_LOINC, "57021-8", "CBC W Auto Differential panel - Blood"),
    ("108252007", "Laboratory procedure", SYS_LOINC, "24331-1", "Lipid 1996 panel - Serum or Plasma"),
    ("363679005", "Imaging", SYS_SNOMED, "399208008", "Plain chest X-ray"),
]

OBSERVATION_CATEGORIES = {"laboratory": "Laboratory", "vital-signs": "Vital Signs", "survey": "Survey"}
# Observations that are sensitive by code (HIV -> HIV, PHQ-9 -> PSY).
HIV_VIRAL_LOAD_DISPLAY = "HIV 1 RNA [#/volume] (viral load) in Serum or Plasma by NAA with probe amplification"
HIV_AB_DISPLAY = "HIV 1 Ab [Presence] in Serum"
PHQ9_DISPLAY = "Patient Health Questionnaire 9 item (PHQ-9) total score [Reported]"
NEGATIVE = {"coding": [{"system": SYS_SNOMED, "code": "260385009", "display": "Negative"}], "text": "Negative"}

# Words for the padding text of bulk entries: realistic-looking free text that
# compresses about as well as real clinical notes (unlike a repeated byte).
FILLER_WORDS = ["patient", "reports", "denies", "follow", "up", "in", "two", "weeks", "stable",
                "no", "acute", "distress", "reviewed", "labs", "with", "plan", "continue",
                "current", "regimen", "monitor", "symptoms", "advised", "hydration", "rest",
                "return", "if", "worse", "specimen", "received", "result", "verified"]


def iso(dt):
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def codeable(system, code, display, text=None):
    return {"coding": [{"system": system, "code": code, "display": display}], "text": text or display}


def security_label(code):
    system, display = SECURITY_LABELS[code]
    return {"system": system, "code": code, "display": display}


def quantity(value, unit):
    return {"value": value, "unit": unit, "system": SYS_UCUM, "code": unit}


def observation_body(patient, when, category, code):
    return {"status": "final",
            "category": [codeable(SYS_OBS_CATEGORY, category, OBSERVATION_CATEGORIES[category])],
            "code": code,
            "subject": ref(patient),
            "effectiveDateTime": iso(when),
            "issued": iso(when + timedelta(minutes=30))}


def ref(resource):
    """Reference to a built resource, with a display like Epic sends."""
    display = resource.get("name")
    if isinstance(display, list):
        display = display[0]["text"]
    return {"reference": f"{resource['resourceType']}/{resource['id']}", "display": display}


# --------------------------------------------------------------------------
# Deterministic synthetic data
# --------------------------------------------------------------------------

class DatasetBuilder:
    """Builds the whole dataset from one seeded RNG, in a fixed order.

    Fixture resources (documented in docs/sandbox-ehr.md) never draw from the
    RNG, so their ids, codes and labels are the same for every seed; only the
    routine history around them varies with the seed.
    """

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.used_ids = set(STABLE_PATIENT_IDS)
        self.resources = []
        self.mrn_counter = 7004211

    def build(self):
        # The directory (organizations, practitioners) comes from its own
        # fixed RNG so fixture patients can reference it seed-independently.
        directory_rng = random.Random("sandbox-ehr-directory")
        self.hospital = self.add("Organization", self.epic_id(directory_rng), NOW - timedelta(days=400),
                                 self.organization("Sandbox General Hospital", "1200 Harbor Road"), version=1)
        self.clinic = self.add("Organization", self.epic_id(directory_rng), NOW - timedelta(days=400),
                               self.organization("Sandbox Family Clinic", "88 Meadow Street"), version=1)
        self.practitioners = [
            self.add("Practitioner", self.epic_id(directory_rng), NOW - timedelta(days=380),
                     self.practitioner(given, family, npi), version=1)
            for given, family, npi in [("Rosalind", "Achterberg", "1999000011"),
                                       ("Tobias", "Vennholm", "1999000029"),
                                       ("Ingrid", "Sallowmere", "1999000037"),
                                       ("Kwame", "Ashdown", "1999000045")]]
        self.fixture_patient_one()
        self.fixture_patient_two()
        for _ in range(PATIENT_COUNT - len(STABLE_PATIENT_IDS)):
            self.generated_patient()
        return self.resources

    # -- primitives ----------------------------------------------------------

    def epic_id(self, rng=None):
        """'e' + 23 alphanumerics, like Epic FHIR ids; unique within the dataset."""
        rng = rng or self.rng
        alphabet = string.ascii_letters + string.digits
        while True:
            rid = "e" + "".join(rng.choice(alphabet) for _ in range(23))
            if rid not in self.used_ids:
                self.used_ids.add(rid)
                return rid

    def add(self, rtype, rid, updated, body, labels=(), version=None):
        """Store a resource; version=None draws a plausible versionId from the RNG."""
        meta = {"versionId": str(version if version is not None else self.rng.randint(1, 3)),
                "lastUpdated": iso(min(updated, NOW))}
        if labels:
            meta["security"] = [security_label(code) for code in labels]
        resource = {"resourceType": rtype, "id": rid, "meta": meta}
        resource.update(body)
        self.resources.append(resource)
        return resource

    def add_routine(self, rtype, updated, body, labels=()):
        """Routine generated resource: about a quarter also carry an explicit `N` label."""
        labels = list(labels)
        if self.rng.random() < 0.25:
            labels.append("N")
        return self.add(rtype, self.epic_id(), updated, body, labels)

    def clinical_time(self, max_days_back, min_days_back=1):
        day = NOW - timedelta(days=self.rng.randint(min_days_back, max_days_back))
        return day.replace(hour=self.rng.randint(7, 17), minute=self.rng.choice([0, 15, 30, 45]))

    def updated_after(self, dt):
        return dt + timedelta(minutes=self.rng.randint(5, 3 * 24 * 60))

    # -- directory -----------------------------------------------------------

    @staticmethod
    def organization(name, line):
        return {"active": True, "name": name,
                "telecom": [{"system": "phone", "value": "608-555-0100", "use": "work"}],
                "address": [{"line": [line], "city": "Madison", "state": "WI", "postalCode": "53703",
                             "country": "US"}]}

    @staticmethod
    def practitioner(given, family, npi):
        return {"identifier": [{"system": SYS_NPI, "value": npi}], "active": True,
                "name": [{"use": "official", "text": f"{given} {family}, MD", "family": family,
                          "given": [given], "suffix": ["MD"]}]}

    # -- patients ------------------------------------------------------------

    def patient_body(self, given, family, gender, birth_date, ssn, line, city, state, postal, phone, gp):
        mrn = str(self.mrn_counter)
        self.mrn_counter += 1
        identifiers = [{"use": "usual",
                        "type": codeable(SYS_V2_0203, "MR", "Medical record number", "MRN"),
                        "system": SYS_MRN, "value": mrn}]
        if ssn:
            identifiers.append({"use": "official",
                                "type": codeable(SYS_V2_0203, "SS", "Social Security number", "SSN"),
                                "system": SYS_SSN, "value": ssn})
        return {
            "identifier": identifiers,
            "active": True,
            "name": [{"use": "official", "text": " ".join(given + [family]), "family": family,
                      "given": given}],
            "telecom": [{"system": "phone", "value": phone, "use": "home"},
                        {"system": "email", "value": f"{given[0].lower()}.{family.lower()}@example.org"}],
            "gender": gender,
            "birthDate": birth_date,
            "address": [{"use": "home", "line": [line], "city": city, "state": state,
                         "postalCode": postal, "country": "US"}],
            "generalPractitioner": [ref(gp)],
            "managingOrganization": ref(self.hospital),
        }

    def generated_patient(self):
        rng = self.rng
        gender = rng.choice(["female", "male"])
        given = [rng.choice(GIVEN_FEMALE if gender == "female" else GIVEN_MALE)]
        if rng.random() < 0.4:
            given.append(rng.choice(GIVEN_FEMALE if gender == "female" else GIVEN_MALE))
        family = rng.choice(FAMILY_NAMES)
        # Adults only, so problem onsets (up to ~7 years back) never precede birth.
        birth = (NOW - timedelta(days=rng.randint(18 * 365, 90 * 365))).strftime("%Y-%m-%d")
        # 9xx area numbers are never issued, so these can't be anyone's SSN.
        ssn = (f"9{rng.randint(0, 99):02d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
               if rng.random() < 0.4 else None)
        city, state, zip_prefix = rng.choice(CITIES)
        body = self.patient_body(
            given, family, gender, birth, ssn,
            f"{rng.randint(10, 9899)} {rng.choice(STREETS)}", city, state,
            f"{zip_prefix}{rng.randint(0, 99):02d}", f"608-555-01{rng.randint(0, 99):02d}",
            rng.choice(self.practitioners))
        labels = ["R"] if rng.random() < 1 / 6 else []
        patient = self.add("Patient", self.epic_id(), self.clinical_time(900), body, labels)
        self.history(patient)
        if rng.random() < 1 / 6:
            # Anxiety disorder: psychiatric content, correctly labelled PSY.
            self.condition(patient, ("F41.1", "Generalized anxiety disorder", "21897009",
                                     "Generalized anxiety disorder", None),
                           self.clinical_time(700), None, "active", labels=["PSY"])
        if rng.random() < 0.25:
            self.consent(patient, self.epic_id(), self.clinical_time(800), fixture=False)
        return patient

    def fixture_patient_one(self):
        """Female patient with SSN; labelled psychiatric, HIV and reproductive-health data."""
        body = self.patient_body(["Theodora", "Ann"], "Quill", "female", "1987-09-12", "900-55-0142",
                                 "417 Alder Lane", "Madison", "WI", "53711", "608-555-0142",
                                 self.practitioners[0])
        patient = self.add("Patient", STABLE_PATIENT_IDS[0], datetime(2025, 11, 3, 14, 2, tzinfo=timezone.utc),
                           body, ["N"], version=1)
        self.history(patient)
        self.condition(patient, ("F32.1", "Major depressive disorder, single episode, moderate",
                                 "370143000", "Major depressive disorder", None),
                       datetime(2024, 2, 10, 15, 20, tzinfo=timezone.utc), None, "active",
                       labels=["PSY", "R"], rid="fx-p1-depression-psy")
        self.fixture_observation(patient, "fx-p1-hiv-viral-load", datetime(2025, 6, 18, 9, 45, tzinfo=timezone.utc),
                                 "laboratory", "20447-9", HIV_VIRAL_LOAD_DISPLAY, quantity(48, "{copies}/mL"),
                                 ["HIV", "R"])
        self.condition(patient, ("Z33.1", "Pregnant state, incidental", "77386006", "Pregnant", None),
                       datetime(2025, 9, 2, 10, 0, tzinfo=timezone.utc), None, "active",
                       labels=["SEX"], rid="fx-p1-pregnancy-sex")
        self.medication_request(
            patient, None, datetime(2023, 5, 4, 11, 30, tzinfo=timezone.utc), "completed",
            ("1000126", "1 ML medroxyprogesterone acetate 150 MG/ML Injection",
             "Inject 1 mL intramuscularly every 3 months"),
            labels=["SEX"], rid="fx-p1-contraception-sex")
        self.consent(patient, "fx-p1-consent-deny-psy", datetime(2024, 3, 1, 9, 0, tzinfo=timezone.utc),
                     fixture=True)

    def fixture_patient_two(self):
        """Restricted (R) male patient; labelled substance-use data plus unlabelled sensitive data."""
        body = self.patient_body(["Daniel", "James"], "Okafor", "male", "1974-03-05", None,
                                 "29 Heron Place", "Verona", "WI", "53593", "608-555-0177",
                                 self.practitioners[1])
        patient = self.add("Patient", STABLE_PATIENT_IDS[1], datetime(2025, 10, 21, 8, 12, tzinfo=timezone.utc),
                           body, ["R"], version=2)
        self.history(patient)
        self.condition(patient, ("F10.20", "Alcohol dependence, uncomplicated", "7200002", "Alcoholism", None),
                       datetime(2023, 11, 14, 13, 0, tzinfo=timezone.utc), None, "active",
                       labels=["ETH", "SUD"], rid="fx-p2-alcohol-eth-sud")
        self.medication_request(
            patient, None, datetime(2023, 11, 14, 13, 40, tzinfo=timezone.utc), "active",
            ("1483744", "naltrexone hydrochloride 50 MG Oral Tablet", "Take 1 tablet by mouth daily"),
            labels=["ETH", "SUD"], rid="fx-p2-naltrexone-eth-sud")
        # The next three are sensitive by code but deliberately carry no
        # meta.security, to exercise label inference in the gateway.
        self.condition(patient, ("F11.20", "Opioid dependence, uncomplicated", "75544000",
                                 "Opioid dependence", None),
                       datetime(2024, 8, 7, 16, 10, tzinfo=timezone.utc), None, "active",
                       rid="fx-p2-opioid-unlabelled")
        self.fixture_observation(patient, "fx-p2-hiv-ab-unlabelled", datetime(2025, 4, 1, 10, 30, tzinfo=timezone.utc),
                                 "laboratory", "7917-8", HIV_AB_DISPLAY, NEGATIVE)
        self.fixture_observation(patient, "fx-p2-phq9-unlabelled", datetime(2025, 4, 1, 10, 0, tzinfo=timezone.utc),
                                 "survey", "44261-6", PHQ9_DISPLAY, quantity(14, "{score}"))

    # -- clinical history ----------------------------------------------------

    def history(self, patient):
        """Encounters with vitals/labs, problems, medications and orders."""
        rng = self.rng
        # At least a week back, so even the longest admission has ended by NOW.
        starts = sorted(self.clinical_time(3 * 365, min_days_back=7) for _ in range(rng.randint(2, 5)))
        for chronic in rng.sample(CHRONIC_CONDITIONS, rng.choice([0, 1, 1, 2, 3])):
            onset = starts[0] - timedelta(days=rng.randint(30, 1500))
            self.condition(patient, chronic, onset, None, "active")
            if chronic[4]:
                self.medication_request(patient, None, starts[0], "active", chronic[4])
        for start in starts:
            kind = rng.choices(ENCOUNTER_KINDS, weights=[k[6] for k in ENCOUNTER_KINDS])[0]
            encounter = self.encounter(patient, kind, start)
            self.observation(patient, encounter, start, "vital-signs", None)
            for vital in rng.sample(VITALS, rng.randint(1, 3)):
                self.observation(patient, encounter, start, "vital-signs", vital)
            if kind[0] != "AMB" or rng.random() < 0.6:
                for lab in rng.sample(LABS, rng.randint(2, 4)):
                    self.observation(patient, encounter, start + timedelta(minutes=40), "laboratory", lab)
            if kind[0] == "EMER" and rng.random() < 0.6:
                acute = rng.choice(ACUTE_CONDITIONS)
                self.condition(patient, acute, start, encounter, "resolved")
                self.medication_request(patient, encounter, start, "completed", acute[4])
            if kind[0] == "AMB" and rng.random() < 0.5:
                self.service_request(patient, encounter, start, rng.choice(SERVICE_ORDERS))

    def encounter(self, patient, kind, start):
        class_code, class_display, type_code, type_display, min_h, max_h, _ = kind
        end = start + timedelta(minutes=int(60 * self.rng.uniform(min_h, max_h)))
        body = {
            "status": "finished",
            "class": {"system": SYS_ACTCODE, "code": class_code, "display": class_display},
            "type": [codeable(SYS_SNOMED, type_code, type_display)],
            "subject": ref(patient),
            "participant": [{"individual": ref(self.rng.choice(self.practitioners))}],
            "period": {"start": iso(start), "end": iso(end)},
            "serviceProvider": ref(self.clinic if class_code == "AMB" else self.hospital),
        }
        return self.add_routine("Encounter", self.updated_after(end), body)

    def observation(self, patient, encounter, when, category, spec):
        """Routine Observation; spec is a LABS/VITALS row, or None for a blood pressure panel."""
        if spec is None:
            code = codeable(SYS_LOINC, "85354-9", "Blood pressure panel with all children optional")
        else:
            code = codeable(SYS_LOINC, spec[0], spec[1])
        body = observation_body(patient, when, category, code)
        body["encounter"] = {"reference": f"Encounter/{encounter['id']}"}
        if spec is None:
            systolic = self.rng.randint(100, 160)
            body["component"] = [
                {"code": codeable(SYS_LOINC, "8480-6", "Systolic blood pressure"),
                 "valueQuantity": quantity(systolic, "mm[Hg]")},
                {"code": codeable(SYS_LOINC, "8462-4", "Diastolic blood pressure"),
                 "valueQuantity": quantity(systolic - self.rng.randint(30, 55), "mm[Hg]")}]
        else:
            _, _, unit, low, high, decimals = spec
            value = round(self.rng.uniform(low, high), decimals)
            body["valueQuantity"] = quantity(int(value) if decimals == 0 else value, unit)
            if category == "laboratory":
                body["referenceRange"] = [{"low": quantity(low, unit), "high": quantity(high, unit)}]
        return self.add_routine("Observation", self.updated_after(when), body)

    def fixture_observation(self, patient, rid, when, category, loinc, display, value, labels=()):
        """Documented fixture: fixed id, value and labels; draws nothing from the RNG."""
        body = observation_body(patient, when, category, codeable(SYS_LOINC, loinc, display))
        body["value" + ("Quantity" if "unit" in value else "CodeableConcept")] = value
        return self.add("Observation", rid, when + timedelta(hours=2), body, labels, version=1)

    def condition(self, patient, spec, onset, encounter, clinical_status, labels=(), rid=None):
        """Condition; with rid it is a documented fixture carrying exactly `labels`."""
        icd, icd_display, snomed, snomed_display, _ = spec
        body = {
            "clinicalStatus": codeable(SYS_COND_CLINICAL, clinical_status, clinical_status.capitalize()),
            "verificationStatus": codeable(SYS_COND_VERIFICATION, "confirmed", "Confirmed"),
            "category": [codeable(SYS_COND_CATEGORY,
                                  "encounter-diagnosis" if encounter else "problem-list-item",
                                  "Encounter Diagnosis" if encounter else "Problem List Item")],
            "code": {"coding": [{"system": SYS_ICD10CM, "code": icd, "display": icd_display},
                                {"system": SYS_SNOMED, "code": snomed, "display": snomed_display}],
                     "text": icd_display},
            "subject": ref(patient),
        }
        if encounter:
            body["encounter"] = {"reference": f"Encounter/{encounter['id']}"}
        body["onsetDateTime"] = iso(onset)
        body["recordedDate"] = iso(onset + timedelta(hours=1))
        if rid:
            return self.add("Condition", rid, onset + timedelta(hours=2), body, labels, version=1)
        return self.add_routine("Condition", self.updated_after(onset), body, labels)

    def medication_request(self, patient, encounter, authored, status, med, labels=(), rid=None):
        """MedicationRequest; with rid it is a documented fixture carrying exactly `labels`."""
        rxnorm, display, sig = med
        body = {
            "status": status,
            "intent": "order",
            "category": [codeable(SYS_MEDREQ_CATEGORY, "outpatient", "Outpatient")],
            "medicationCodeableConcept": codeable(SYS_RXNORM, rxnorm, display),
            "subject": ref(patient),
        }
        if encounter:
            body["encounter"] = {"reference": f"Encounter/{encounter['id']}"}
        body["authoredOn"] = iso(authored)
        # Fixtures must not draw from the RNG, so they get a fixed prescriber.
        body["requester"] = ref(self.practitioners[2] if rid else self.rng.choice(self.practitioners))
        body["dosageInstruction"] = [{"text": sig}]
        if rid:
            return self.add("MedicationRequest", rid, authored + timedelta(minutes=10), body, labels, version=1)
        return self.add_routine("MedicationRequest", self.updated_after(authored), body)

    def service_request(self, patient, encounter, authored, order):
        category_code, category_display, system, code, display = order
        body = {
            # Orders placed in the last month are still open.
            "status": "active" if NOW - authored < timedelta(days=30) else "completed",
            "intent": "order",
            "category": [codeable(SYS_SNOMED, category_code, category_display)],
            "code": codeable(system, code, display),
            "subject": ref(patient),
            "encounter": {"reference": f"Encounter/{encounter['id']}"},
            "authoredOn": iso(authored),
            "requester": ref(self.rng.choice(self.practitioners)),
        }
        return self.add_routine("ServiceRequest", self.updated_after(authored), body)

    def consent(self, patient, rid, when, fixture):
        """Privacy consent.  The fixture permits sharing except psychiatry (PSY) data."""
        provision = {"type": "permit", "period": {"start": iso(when)}}
        if fixture:
            provision["provision"] = [{"type": "deny", "securityLabel": [security_label("PSY")]}]
        body = {
            "status": "active",
            "scope": codeable(SYS_CONSENT_SCOPE, "patient-privacy", "Privacy Consent"),
            "category": [codeable(SYS_LOINC, "59284-0", "Patient Consent")],
            "patient": ref(patient),
            "dateTime": iso(when),
            "organization": [ref(self.hospital)],
            "policyRule": codeable(SYS_ACTCODE, "OPTIN", "opt-in"),
            "provision": provision,
        }
        if fixture:
            return self.add("Consent", rid, when, body, ["N"], version=1)
        return self.add("Consent", rid, self.updated_after(when), body)


def build_dataset(seed):
    return DatasetBuilder(seed).build()


# --------------------------------------------------------------------------
# Search parameters
# --------------------------------------------------------------------------

def as_list(value):
    """FHIR elements may be lists or single objects; created resources can be anything."""
    if isinstance(value, list):
        return value
    return [] if value is None else [value]


def normalize_reference(value):
    """'Patient/1', 'http://x/fhir/Patient/1' -> 'Patient/1' (exact comparison follows)."""
    if not isinstance(value, str):
        return ""
    if "://" in value:
        value = "/".join(value.rsplit("/", 2)[-2:])
    return value


def codings(element):
    return [(c.get("system"), c.get("code")) for cc in as_list(element) if isinstance(cc, dict)
            for c in as_list(cc.get("coding")) if isinstance(c, dict)]


def token_of_codeable(field):
    return lambda r: codings(r.get(field))


def token_of_coding(field):
    return lambda r: [(c.get("system"), c.get("code")) for c in as_list(r.get(field)) if isinstance(c, dict)]


def token_of_code(field):
    """A plain `code` element has no system of its own."""
    return lambda r: [(None, r[field])] if isinstance(r.get(field), str) else []


def token_of_identifier(r):
    return [(i.get("system"), i.get("value")) for i in as_list(r.get("identifier")) if isinstance(i, dict)]


def references(field, only_patients=False):
    def extract(r):
        refs = [normalize_reference(x.get("reference")) for x in as_list(r.get(field)) if isinstance(x, dict)]
        return [x for x in refs if x.startswith("Patient/")] if only_patients else refs
    return extract


def strings_of_name(parts):
    def extract(r):
        values = []
        for name in as_list(r.get("name")):
            if isinstance(name, str):          # Organization.name is a plain string
                values.append(name)
            elif isinstance(name, dict):
                for part in parts:
                    values.extend(v for v in as_list(name.get(part)) if isinstance(v, str))
        return values
    return extract


def date_at(*path):
    def extract(r):
        value = r
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return [value] if isinstance(value, str) else []
    return extract


SearchParam = collections.namedtuple("SearchParam", "kind extract")
ID_PARAM = SearchParam("token", lambda r: [(None, r.get("id"))])
PATIENT_PARAM = SearchParam("reference", references("subject", only_patients=True))
SUBJECT_PARAM = SearchParam("reference", references("subject"))
STATUS_PARAM = SearchParam("token", token_of_code("status"))

# Per resource type: the search parameters it supports.  Anything else is
# rejected with 400, as strict servers do, so tests notice typos.
SEARCH_PARAMS = {
    "Patient": {
        "_id": ID_PARAM,
        "identifier": SearchParam("token", token_of_identifier),
        "family": SearchParam("string", strings_of_name(["family"])),
        "name": SearchParam("string", strings_of_name(["text", "family", "given", "prefix", "suffix"])),
        "birthdate": SearchParam("date", date_at("birthDate")),
        "gender": SearchParam("token", token_of_code("gender")),
    },
    "Encounter": {
        "_id": ID_PARAM, "patient": PATIENT_PARAM, "subject": SUBJECT_PARAM, "status": STATUS_PARAM,
        "class": SearchParam("token", token_of_coding("class")),
        "date": SearchParam("date", date_at("period", "start")),
    },
    "Observation": {
        "_id": ID_PARAM, "patient": PATIENT_PARAM, "subject": SUBJECT_PARAM, "status": STATUS_PARAM,
        "category": SearchParam("token", token_of_codeable("category")),
        "code": SearchParam("token", token_of_codeable("code")),
        "date": SearchParam("date", date_at("effectiveDateTime")),
    },
    "MedicationRequest": {
        "_id": ID_PARAM, "patient": PATIENT_PARAM, "subject": SUBJECT_PARAM, "status": STATUS_PARAM,
        "intent": SearchParam("token", token_of_code("intent")),
        "category": SearchParam("token", token_of_codeable("category")),
        "code": SearchParam("token", token_of_codeable("medicationCodeableConcept")),
    },
    "ServiceRequest": {
        "_id": ID_PARAM, "patient": PATIENT_PARAM, "subject": SUBJECT_PARAM, "status": STATUS_PARAM,
        "intent": SearchParam("token", token_of_code("intent")),
        "category": SearchParam("token", token_of_codeable("category")),
        "code": SearchParam("token", token_of_codeable("code")),
    },
    "Condition": {
        # Condition has no `status`; FHIR names it clinical-status.
        "_id": ID_PARAM, "patient": PATIENT_PARAM, "subject": SUBJECT_PARAM,
        "clinical-status": SearchParam("token", token_of_codeable("clinicalStatus")),
        "category": SearchParam("token", token_of_codeable("category")),
        "code": SearchParam("token", token_of_codeable("code")),
    },
    "Consent": {
        "_id": ID_PARAM, "status": STATUS_PARAM,
        "patient": SearchParam("reference", references("patient", only_patients=True)),
        "category": SearchParam("token", token_of_codeable("category")),
        "date": SearchParam("date", date_at("dateTime")),
    },
    "Organization": {"_id": ID_PARAM, "name": SearchParam("string", strings_of_name([]))},
    "Practitioner": {
        "_id": ID_PARAM, "identifier": SearchParam("token", token_of_identifier),
        "name": SearchParam("string", strings_of_name(["text", "family", "given"])),
    },
}
RESOURCE_TYPES = list(SEARCH_PARAMS)


class FhirError(Exception):
    """Raised anywhere in request handling; rendered as an OperationOutcome."""

    def __init__(self, status, issue_code, diagnostics):
        super().__init__(diagnostics)
        self.status = status
        self.issue_code = issue_code
        self.diagnostics = diagnostics


def compile_filter(name, param, raw):
    """Turn one `name=v1,v2` occurrence into a predicate (values are OR-ed)."""
    values = raw.split(",")
    if param.kind == "token":
        tokens = []
        for value in values:
            if "|" in value:
                system, code = value.split("|", 1)
                tokens.append((system, code or None))     # 'sys|' matches any code in sys
            else:
                tokens.append((None, value))               # bare code matches any system

        def match_token(resource):
            for system, code in param.extract(resource):
                for q_system, q_code in tokens:
                    if q_system is None:
                        hit = code == q_code
                    elif q_system == "":                   # '|code': code without a system
                        hit = system is None and code == q_code
                    else:
                        hit = system == q_system and (q_code is None or code == q_code)
                    if hit:
                        return True
            return False
        return match_token

    if param.kind == "reference":
        # A bare id means a Patient for every reference parameter served here.
        wanted = {normalize_reference(v) if "/" in v else f"Patient/{v}" for v in values}
        return lambda resource: any(r in wanted for r in param.extract(resource))

    if param.kind == "string":
        # FHIR string search: case-insensitive "starts with".
        prefixes = [v.casefold() for v in values]
        return lambda resource: any(s.casefold().startswith(p) for s in param.extract(resource)
                                    for p in prefixes)

    # date: ISO-8601 strings in one timezone compare correctly as text once the
    # stored value is cut to the precision of the query value.
    comparisons = []
    for value in values:
        m = DATE_PARAM_RE.match(value)
        if not m:
            raise FhirError(400, "invalid", f"invalid date value '{value}' for parameter '{name}'")
        comparisons.append((m.group(1) or "eq", m.group(2)))
    ops = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "gt": lambda a, b: a > b,
           "lt": lambda a, b: a < b, "ge": lambda a, b: a >= b, "le": lambda a, b: a <= b}
    return lambda resource: any(ops[op](stored[:len(q)], q) for stored in param.extract(resource)
                                for op, q in comparisons)


def parse_int_param(name, value):
    if not (value.isascii() and value.isdigit()):
        raise FhirError(400, "invalid", f"parameter '{name}' must be a non-negative integer")
    return int(value)


def capability_statement(base_url):
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-01-01",
        "publisher": "ehrgate sandbox EHR (synthetic data only)",
        "kind": "instance",
        "software": {"name": "ehrgate sandbox EHR", "version": "1.0"},
        "implementation": {"description": "Simulated Epic-style FHIR R4 server for ehrgate tests",
                           "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [{
            "mode": "server",
            "resource": [{
                "type": rtype,
                "interaction": [{"code": c} for c in
                                ("read", "vread", "search-type", "create", "update", "delete")],
                "searchParam": [{"name": name, "type": param.kind} for name, param in params.items()]
                + [{"name": "_count", "type": "number"}, {"name": "_offset", "type": "number"}],
            } for rtype, params in SEARCH_PARAMS.items()],
        }],
    }


# --------------------------------------------------------------------------
# Bulk stream
# --------------------------------------------------------------------------

def bulk_bundle_parts(seed, megabytes, raw_value, base_url, patient_ids):
    """Yield the text of a ~`megabytes` MiB searchset Bundle piece by piece.

    Entries are padded to BULK_ENTRY_BYTES, so memory stays flat whatever the
    size and Bundle.total can lead the stream.  Every 10th entry is an HIV
    viral load labelled HIV+R, every 10th+3 a PHQ-9 labelled PSY, and every
    10th+5 an unlabelled HIV antibody test; the rest are routine labs.
    """
    count = max(1, round(megabytes * 1024 * 1024 / (BULK_ENTRY_BYTES + 1)))
    rng = random.Random(f"sandbox-ehr-bulk:{seed}")
    filler = " ".join(rng.choice(FILLER_WORDS) for _ in range(12000))
    placeholder = "@@PAD@@"
    head = {"resourceType": "Bundle", "type": "searchset", "total": count,
            "link": [{"relation": "self", "url": f"{base_url}/Observation?{urlencode({BULK_PARAM: raw_value})}"}]}
    yield json.dumps(head, separators=(",", ":"))[:-1] + ',"entry":['
    for i in range(count):
        when = NOW - timedelta(minutes=7 * i + 1)
        kind = i % 10
        labels = []
        if kind == 0:
            category, code, value = ("laboratory", ("20447-9", HIV_VIRAL_LOAD_DISPLAY),
                                     quantity(rng.randint(20, 90000), "{copies}/mL"))
            labels = ["HIV", "R"]
        elif kind == 3:
            category, code, value = "survey", ("44261-6", PHQ9_DISPLAY), quantity(rng.randint(0, 27), "{score}")
            labels = ["PSY"]
        elif kind == 5:
            category, code, value = "laboratory", ("7917-8", HIV_AB_DISPLAY), NEGATIVE
        else:
            lab = LABS[rng.randrange(len(LABS))]
            category, code = "laboratory", lab[:2]
            value = quantity(round(rng.uniform(lab[3], lab[4]), lab[5]), lab[2])
        obs_id = f"bulk-{i:07d}"
        meta = {"versionId": "1", "lastUpdated": iso(when + timedelta(hours=1))}
        if labels:
            meta["security"] = [security_label(c) for c in labels]
        resource = {"resourceType": "Observation", "id": obs_id, "meta": meta, "status": "final",
                    "category": [codeable(SYS_OBS_CATEGORY, category, OBSERVATION_CATEGORIES[category])],
                    "code": codeable(SYS_LOINC, code[0], code[1]),
                    "subject": {"reference": f"Patient/{patient_ids[i % len(patient_ids)]}"},
                    "effectiveDateTime": iso(when)}
        resource["value" + ("Quantity" if "unit" in value else "CodeableConcept")] = value
        resource["note"] = [{"text": placeholder}]
        entry = json.dumps({"fullUrl": f"{base_url}/Observation/{obs_id}", "resource": resource,
                            "search": {"mode": "match"}}, separators=(",", ":"))
        pad = max(1, BULK_ENTRY_BYTES - (len(entry) - len(placeholder)))
        start = (i * 7919) % (len(filler) - pad)
        yield ("," if i else "") + entry.replace(placeholder, filler[start:start + pad], 1)
    yield "]}"


# --------------------------------------------------------------------------
# In-memory store and request log
# --------------------------------------------------------------------------

class Store:
    """Resources by type and id.  Stored dicts are never mutated in place, so a
    handler may serialize one after releasing the lock."""

    def __init__(self, resources, seed):
        self._lock = threading.Lock()
        self._data = {rtype: {} for rtype in RESOURCE_TYPES}
        for resource in resources:
            self._data[resource["resourceType"]][resource["id"]] = resource
        # Ids for created resources are deterministic too, so test runs repeat.
        self._id_rng = random.Random(f"sandbox-ehr-create:{seed}")

    def get(self, rtype, rid):
        with self._lock:
            return self._data[rtype].get(rid)

    def all(self, rtype):
        with self._lock:
            return list(self._data[rtype].values())

    def count(self):
        with self._lock:
            return sum(len(by_id) for by_id in self._data.values())

    @staticmethod
    def _stamp(resource, rid, version):
        meta = dict(resource["meta"]) if isinstance(resource.get("meta"), dict) else {}
        meta["versionId"] = str(version)
        meta["lastUpdated"] = iso(datetime.now(timezone.utc))
        stored = {"resourceType": resource["resourceType"], "id": rid, "meta": meta}
        stored.update((k, v) for k, v in resource.items() if k not in stored)
        return stored

    def create(self, resource):
        rtype = resource["resourceType"]
        alphabet = string.ascii_letters + string.digits
        with self._lock:
            rid = None
            while rid is None or rid in self._data[rtype]:
                rid = "e" + "".join(self._id_rng.choice(alphabet) for _ in range(23))
            stored = self._stamp(resource, rid, 1)
            self._data[rtype][rid] = stored
            return stored

    def put(self, resource, rid):
        """Update, or create with the client's id (FHIR update-as-create).  Returns (resource, created)."""
        rtype = resource["resourceType"]
        with self._lock:
            current = self._data[rtype].get(rid)
            version = int(current["meta"]["versionId"]) + 1 if current else 1
            stored = self._stamp(resource, rid, version)
            self._data[rtype][rid] = stored
            return stored, current is None

    def delete(self, rtype, rid):
        with self._lock:
            return self._data[rtype].pop(rid, None) is not None


class RequestLog:
    """What the sandbox received: lets tests assert on what the gateway forwarded."""

    def __init__(self):
        self._lock = threading.Lock()
        self._count = 0
        self._recent = collections.deque(maxlen=RECENT_REQUESTS)

    def record(self, method, path, query, headers):
        names = {}
        for name, value in headers.items():
            key = name.lower()
            names[key] = f"{names[key]}, {value}" if key in names else value
        with self._lock:
            self._count += 1
            self._recent.append({"method": method, "path": path, "query": query, "headers": names})

    def snapshot(self):
        with self._lock:
            return {"requests": self._count, "recent": list(self._recent)}

    def reset(self):
        with self._lock:
            self._count = 0
            self._recent.clear()


# --------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------

def json_bytes(obj):
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def operation_outcome(issue_code, diagnostics, severity="error"):
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": issue_code, "diagnostics": diagnostics}]}


def accepts_gzip(header):
    """True only if Accept-Encoding explicitly allows gzip (q > 0)."""
    for item in header.split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() not in ("gzip", "x-gzip"):
            continue
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        return q > 0
    return False


class SandboxHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"        # keep-alive; every response has a length or is chunked
    server_version = "SandboxEHR/1.0"
    # Headers and body go out in separate writes; without TCP_NODELAY Nagle plus
    # delayed ACKs would add ~40 ms to every keep-alive response.
    disable_nagle_algorithm = True
    # Idle keep-alive connections are dropped after this, freeing their thread.
    timeout = 300

    def do_GET(self):
        self.dispatch()

    def do_POST(self):
        self.dispatch()

    def do_PUT(self):
        self.dispatch()

    def do_DELETE(self):
        self.dispatch()

    # -- plumbing --------------------------------------------------------------

    def version_string(self):
        return self.server_version            # no Python version in the Server header

    def log_message(self, fmt, *args):
        if self.server.verbose:
            super().log_message(fmt, *args)

    def send_error(self, code, message=None, explain=None):
        """Protocol-level errors raised by http.server itself (bad request line,
        unsupported method...), rendered as OperationOutcome.  The connection is
        closed as in the base class because the input may be out of sync."""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        issue = {501: "not-supported", 414: "too-long", 431: "too-long"}.get(
            code, "exception" if code >= 500 else "invalid")
        body = json_bytes(operation_outcome(issue, message or explain or "protocol error"))
        self.send_response(code)
        self.send_header("Connection", "close")
        self.send_header("Content-Type", FHIR_JSON)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def dispatch(self):
        self.response_started = False
        url = urlsplit(self.path)
        try:
            body = self.read_body()
            if url.path == "/__sandbox" or url.path.startswith("/__sandbox/"):
                self.handle_sandbox(url.path, url.query)
            else:
                self.server.request_log.record(self.command, url.path, url.query, self.headers)
                self.handle_fhir(url.path, url.query, body)
        except FhirError as e:
            self.send_outcome(e)
        except (ConnectionError, TimeoutError):
            self.close_connection = True          # client went away; nothing to answer
        except Exception:
            traceback.print_exc(file=sys.stderr)
            if self.response_started:
                self.close_connection = True      # too late for a status; truncate instead
            else:
                self.send_outcome(FhirError(500, "exception", "internal sandbox error, see its stderr"))

    def read_body(self):
        """Read the whole request body (Content-Length or chunked) so keep-alive
        stays in sync even when the request is then rejected."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self.read_chunked_body()
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        if not length.strip().isdigit():
            self.close_connection = True
            raise FhirError(400, "invalid", "invalid Content-Length")
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            raise FhirError(413, "too-long", f"request body exceeds {MAX_BODY_BYTES} bytes")
        return self.rfile.read(int(length))

    def read_chunked_body(self):
        parts, total = [], 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise FhirError(400, "invalid", "malformed chunked request body") from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass                          # discard trailers
                return b"".join(parts)
            total += size
            if total > MAX_BODY_BYTES:
                self.close_connection = True
                raise FhirError(413, "too-long", f"request body exceeds {MAX_BODY_BYTES} bytes")
            parts.append(self.rfile.read(size))
            self.rfile.readline(1024)             # CRLF after each chunk

    def base_url(self):
        """Absolute base for links, from the Host the client (the gateway) used."""
        host = self.headers.get("Host", "")
        if not HOST_HEADER_RE.match(host):
            address, port = self.server.server_address[:2]
            host = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        return f"http://{host}{self.server.base_path}"

    def send_body(self, status, body, content_type=FHIR_JSON, headers=()):
        compress = bool(body) and accepts_gzip(self.headers.get("Accept-Encoding", ""))
        if compress:
            body = gzip.compress(body, compresslevel=GZIP_LEVEL, mtime=0)
        self.send_response(status)
        if status != 204:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Vary", "Accept-Encoding")
        if compress:
            self.send_header("Content-Encoding", "gzip")
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.response_started = True
        if body:
            self.wfile.write(body)

    def send_json(self, status, obj, content_type=FHIR_JSON, headers=()):
        self.send_body(status, json_bytes(obj), content_type, headers)

    def send_outcome(self, error):
        self.send_json(error.status, operation_outcome(error.issue_code, error.diagnostics))

    def send_stream(self, parts):
        """Stream text parts: chunked for HTTP/1.1, close-delimited for HTTP/1.0
        (nginx talks HTTP/1.0 to upstreams unless proxy_http_version 1.1)."""
        chunked = self.request_version != "HTTP/1.0"
        compressor = (zlib.compressobj(BULK_GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
                      if accepts_gzip(self.headers.get("Accept-Encoding", "")) else None)
        self.send_response(200)
        self.send_header("Content-Type", FHIR_JSON)
        self.send_header("Vary", "Accept-Encoding")
        if compressor:
            self.send_header("Content-Encoding", "gzip")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
        self.end_headers()
        self.response_started = True

        def write(data):
            if data:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)

        buffered, size = [], 0
        for part in parts:
            buffered.append(part)
            size += len(part)
            if size >= STREAM_CHUNK_BYTES:
                data = "".join(buffered).encode("utf-8")
                write(compressor.compress(data) if compressor else data)
                buffered, size = [], 0
        data = "".join(buffered).encode("utf-8")
        write(compressor.compress(data) + compressor.flush() if compressor else data)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    # -- test hooks ------------------------------------------------------------

    def sandbox_stream(self, params):
        """GET /Observation?_sandbox_stream=N: a generated search Bundle of about N MB for the
        redaction tests (every tenth entry an unlabelled opioid-dependence Condition), made on the
        fly. _sandbox_malformed=mid puts a broken entry after the first ones (after the headers
        went out); _sandbox_malformed=single answers a truncated single resource, =html an HTML
        page, =gzip a gzip-encoded resource nobody asked for."""
        mode = params.get("_sandbox_malformed", "")
        patient = STABLE_PATIENT_IDS[0]
        if mode == "single":
            self.send_body(200, b'{"resourceType":"Observation","id":"BROKEN-single","status":"fin',
                           FHIR_JSON)
            return
        if mode == "html":
            self.send_body(200, b"<html><body>SECRET-html</body></html>", "text/html")
            return
        if mode == "gzip":  # compressed although the caller did not ask for it
            body = gzip.compress(b'{"resourceType":"Observation","id":"SECRET-gzip"}', mtime=0)
            self.send_response(200)
            self.send_header("Content-Type", FHIR_JSON)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.response_started = True
            self.wfile.write(body)
            return
        target = parse_int_param("_sandbox_stream", params.get("_sandbox_stream", "1")) * 1024 * 1024
        if target > 512 * 1024 * 1024:
            raise FhirError(400, "invalid", "mb must be at most 512")
        observation = ('{"fullUrl":"urn:uuid:%d","resource":{"resourceType":"Observation","id":"gen-%d",'
                       '"status":"final","category":[{"coding":[{"system":"http://terminology.hl7.org/'
                       'CodeSystem/observation-category","code":"vital-signs"}]}],"code":{"coding":[{'
                       '"system":"http://loinc.org","code":"8867-4","display":"Heart rate"}]},'
                       '"subject":{"reference":"Patient/' + patient + '"},"effectiveDateTime":'
                       '"2024-01-01T00:00:00Z","valueQuantity":{"value":72,"unit":"/min","system":'
                       '"http://unitsofmeasure.org","code":"/min"}},"search":{"mode":"match"}}')
        condition = ('{"fullUrl":"urn:uuid:%d","resource":{"resourceType":"Condition","id":"gen-%d",'
                     '"code":{"coding":[{"system":"http://hl7.org/fhir/sid/icd-10-cm","code":"F11.20",'
                     '"display":"Opioid dependence, uncomplicated"}]},"subject":{"reference":"Patient/'
                     + patient + '"}},"search":{"mode":"match"}}')

        def parts():
            yield '{"resourceType":"Bundle","type":"searchset","total":%d,"entry":[' % (target // 500)
            sent, n = 0, 0
            while sent < target:
                batch = []
                for _ in range(200):
                    if n == 150 and mode == "mid":
                        batch.append('{"resource":{"resourceType":"Observation","id":"BROKEN-mid","x":tru}}')
                    else:
                        batch.append((condition if n % 10 == 3 else observation) % (n, n))
                    n += 1
                text = ("," if sent else "") + ",".join(batch)
                sent += len(text)
                yield text
            yield "]}"

        self.send_stream(parts())

    def handle_sandbox(self, path, query):
        """/__sandbox/* hooks; not FHIR and not counted in the request log."""
        log = self.server.request_log
        if path == "/__sandbox/stats" and self.command == "GET":
            self.send_json(200, log.snapshot(), PLAIN_JSON)
        elif path == "/__sandbox/reset" and self.command == "POST":
            log.reset()
            self.send_json(200, {"reset": True}, PLAIN_JSON)
        elif path == "/__sandbox/slow" and self.command == "GET":
            ms = parse_int_param("ms", dict(parse_qsl(query)).get("ms", "0"))
            if ms > MAX_SLOW_MS:
                raise FhirError(400, "invalid", f"ms must be at most {MAX_SLOW_MS}")
            time.sleep(ms / 1000)
            self.send_json(200, {"slept_ms": ms}, PLAIN_JSON)
        else:
            raise FhirError(404, "not-found", f"no sandbox hook {self.command} {path}")

    # -- FHIR ------------------------------------------------------------------

    def handle_fhir(self, path, query, body):
        base = self.server.base_path
        if path != base and not path.startswith(base + "/"):
            raise FhirError(404, "not-found", f"no FHIR endpoint at {path}")
        parts = [unquote(p) for p in path[len(base):].split("/") if p]
        method = self.command
        if parts == ["metadata"]:
            self.require(method, "GET")
            self.send_json(200, capability_statement(self.base_url()))
            return
        if not parts:
            raise FhirError(404, "not-found", "no resource type in request path")
        rtype, rest = parts[0], parts[1:]
        if rtype == "Observation" and not rest and method == "GET" and "_sandbox_stream=" in query:
            self.sandbox_stream(dict(parse_qsl(query)))
            return
        if rtype not in SEARCH_PARAMS:
            raise FhirError(404, "not-supported", f"unknown resource type '{rtype}'")
        if not rest:
            self.require(method, "GET", "POST")
            if method == "GET":
                self.search(rtype, parse_qsl(query, keep_blank_values=True))
            else:
                self.create(rtype, body)
        elif rest == ["_search"]:
            self.require(method, "POST")
            try:
                form = parse_qsl(body.decode("utf-8"), keep_blank_values=True)
            except UnicodeDecodeError:
                raise FhirError(400, "invalid", "_search body must be UTF-8 form data") from None
            self.search(rtype, parse_qsl(query, keep_blank_values=True) + form)
        elif len(rest) == 1:
            self.require(method, "GET", "PUT", "DELETE")
            {"GET": self.read, "PUT": self.update, "DELETE": self.delete}[method](rtype, rest[0], body)
        elif len(rest) == 3 and rest[1] == "_history":
            self.require(method, "GET")
            self.vread(rtype, rest[0], rest[2])
        else:
            raise FhirError(404, "not-found", f"unsupported FHIR path {path}")

    @staticmethod
    def require(method, *allowed):
        if method not in allowed:
            raise FhirError(405, "not-supported", f"{method} is not allowed here")

    def existing(self, rtype, rid):
        resource = self.server.store.get(rtype, rid)
        if resource is None:
            raise FhirError(404, "not-found", f"resource {rtype}/{rid} is not known")
        return resource

    @staticmethod
    def etag(resource):
        return ("ETag", f'W/"{resource["meta"]["versionId"]}"')

    def read(self, rtype, rid, _body):
        resource = self.existing(rtype, rid)
        self.send_json(200, resource, headers=[self.etag(resource)])

    def vread(self, rtype, rid, vid):
        resource = self.existing(rtype, rid)
        if resource["meta"]["versionId"] != vid:
            raise FhirError(404, "not-found", f"version {vid} of {rtype}/{rid} is not known "
                                              f"(only the current version is kept)")
        self.send_json(200, resource, headers=[self.etag(resource)])

    @staticmethod
    def parse_resource(rtype, body):
        try:
            resource = json.loads(body.decode("utf-8"))
        except ValueError as e:
            raise FhirError(400, "invalid", f"request body is not valid JSON: {e}") from None
        if not isinstance(resource, dict) or resource.get("resourceType") != rtype:
            raise FhirError(400, "invalid", f"request body must be a {rtype} resource")
        return resource

    def send_written(self, status, resource):
        location = (f"{self.base_url()}/{resource['resourceType']}/{resource['id']}"
                    f"/_history/{resource['meta']['versionId']}")
        self.send_json(status, resource, headers=[("Location", location), self.etag(resource)])

    def create(self, rtype, body):
        self.send_written(201, self.server.store.create(self.parse_resource(rtype, body)))

    def update(self, rtype, rid, body):
        if not FHIR_ID_RE.match(rid):
            raise FhirError(400, "invalid", f"'{rid}' is not a valid FHIR id")
        resource = self.parse_resource(rtype, body)
        if resource.get("id", rid) != rid:
            raise FhirError(400, "invalid", "resource id in body does not match the URL")
        stored, created = self.server.store.put(resource, rid)
        self.send_written(201 if created else 200, stored)

    def delete(self, rtype, rid, _body):
        if not self.server.store.delete(rtype, rid):
            raise FhirError(404, "not-found", f"resource {rtype}/{rid} is not known")
        self.send_body(204, b"")

    def search(self, rtype, params):
        if rtype == "Observation" and any(name == BULK_PARAM for name, _ in params):
            self.bulk(params)
            return
        supported = SEARCH_PARAMS[rtype]
        filters, count, offset = [], DEFAULT_COUNT, 0
        for name, value in params:
            if name not in supported and name not in ("_count", "_offset"):
                raise FhirError(400, "not-supported", f"unknown search parameter '{name}' for {rtype}")
            if value == "":
                continue                          # FHIR: empty parameter values are ignored
            if name == "_count":
                count = min(parse_int_param(name, value), MAX_COUNT)
            elif name == "_offset":
                offset = parse_int_param(name, value)
            else:
                filters.append(compile_filter(name, supported[name], value))
        matches = [r for r in self.server.store.all(rtype) if all(f(r) for f in filters)]

        base = self.base_url()
        kept = [(n, v) for n, v in params if n not in ("_count", "_offset")]

        def link(relation, page_offset):
            query = urlencode(kept + [("_count", count), ("_offset", page_offset)])
            return {"relation": relation, "url": f"{base}/{rtype}?{query}"}

        links = [link("self", offset)]
        if count and offset + count < len(matches):
            links.append(link("next", offset + count))
        if count and offset > 0:
            links.append(link("previous", max(0, offset - count)))
        bundle = {"resourceType": "Bundle", "type": "searchset", "total": len(matches), "link": links}
        page = matches[offset:offset + count]
        if page:
            bundle["entry"] = [{"fullUrl": f"{base}/{rtype}/{r['id']}", "resource": r,
                                "search": {"mode": "match"}} for r in page]
        self.send_json(200, bundle)

    def bulk(self, params):
        others = sorted({name for name, _ in params if name != BULK_PARAM})
        values = [value for name, value in params if name == BULK_PARAM]
        if others:
            raise FhirError(400, "not-supported", f"{BULK_PARAM} cannot be combined with {', '.join(others)}")
        if len(values) != 1:
            raise FhirError(400, "invalid", f"{BULK_PARAM} must be given once")
        try:
            megabytes = float(values[0])
        except ValueError:
            megabytes = float("nan")
        if not 0 < megabytes <= BULK_MAX_MB:      # also rejects NaN
            raise FhirError(400, "invalid", f"{BULK_PARAM} must be a number in (0, {BULK_MAX_MB}]")
        self.send_stream(bulk_bundle_parts(self.server.seed, megabytes, values[0], self.base_url(),
                                           self.server.patient_ids))


class SandboxServer(ThreadingHTTPServer):
    daemon_threads = True
    # Load tests open a few hundred keep-alive connections at once.
    request_queue_size = 512

    def __init__(self, address, seed, base_path, verbose):
        self.seed = seed
        self.base_path = base_path
        self.verbose = verbose
        resources = build_dataset(seed)
        self.store = Store(resources, seed)
        self.patient_ids = [r["id"] for r in resources if r["resourceType"] == "Patient"]
        self.request_log = RequestLog()
        super().__init__(address, SandboxHandler)

    def handle_error(self, request, client_address):
        # Clients (nginx included) drop connections at will; that is not an error.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class SandboxServer6(SandboxServer):
    address_family = socket.AF_INET6


class Shutdown(Exception):
    """Raised by the signal handler to leave serve_forever() in the main thread."""


def normalize_base_path(value):
    path = "/" + value.strip("/")
    return "" if path == "/" else path


def main(argv=None):
    parser = argparse.ArgumentParser(description="Simulated Epic-style FHIR R4 server (synthetic data).")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8090, help="port to listen on; 0 picks a free port")
    parser.add_argument("--seed", type=int, default=7, help="data generation seed (default 7)")
    parser.add_argument("--base-path", default="/fhir", help="FHIR base path (default /fhir)")
    parser.add_argument("--quiet", action="store_true", help="no startup summary on stderr")
    parser.add_argument("--verbose", action="store_true", help="log every request on stderr")
    args = parser.parse_args(argv)

    server_class = SandboxServer6 if ":" in args.host else SandboxServer
    server = server_class((args.host, args.port), args.seed, normalize_base_path(args.base_path),
                          args.verbose)

    def stop(_signum, _frame):
        raise Shutdown()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        port = server.server_address[1]
        print(f"SANDBOX_EHR READY port={port}", flush=True)
        if not args.quiet:
            host = f"[{args.host}]" if ":" in args.host else args.host
            print(f"sandbox_ehr: http://{host}:{port}{server.base_path} seed={args.seed} "
                  f"patients={len(server.patient_ids)} resources={server.store.count()} (synthetic data)",
                  file=sys.stderr, flush=True)
        server.serve_forever()
    except Shutdown:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
