"""A curated pathology lexicon and the word lists used by the rule-based keyword extractor.

Everything is plain Python data (no downloads, no I/O). Terms are written in their canonical form:
lowercase, singular, American spelling (``tumor``, ``hemorrhage``, ``edema``); hyphens inside a term
(``ki-67``, ``reed-sternberg cell``) match either a hyphen or a space in text. British spellings and
common abbreviations map to the canonical term through :data:`SPELLING` and :data:`ALIASES`.

The categories follow how pathologists describe a slide: tissues and structures, cell types,
architectural patterns, cytologic features, processes and diagnoses, grades, and stains/markers.
"""

from __future__ import annotations

TISSUES: tuple[str, ...] = (
    # tissue types and layers
    "adipose tissue", "fat", "fibroadipose tissue", "fibrous tissue", "connective tissue",
    "fibromuscular tissue", "granulation tissue", "lymphoid tissue", "necrotic tissue", "soft tissue",
    "stroma", "desmoplastic stroma", "parenchyma", "interstitium", "epithelium", "squamous epithelium",
    "columnar epithelium", "cuboidal epithelium", "transitional epithelium", "respiratory epithelium",
    "glandular epithelium", "surface epithelium", "urothelium", "endothelium", "mesothelium",
    "mucosa", "submucosa", "muscularis propria", "muscularis mucosae", "lamina propria", "serosa",
    "subserosa", "adventitia", "capsule", "cortex", "medulla", "dermis", "epidermis", "subcutis",
    "muscle", "skeletal muscle", "smooth muscle", "myometrium", "endometrium", "basalis endometrium",
    "functionalis", "decidua", "cartilage", "bone", "bone marrow", "marrow", "nerve", "peripheral nerve",
    "ganglion", "basement membrane", "keratin", "colloid", "mucin", "collagen", "elastin", "fibrin",
    "osteoid", "hyaline cartilage", "scar", "blood", "serum",
    # vessels and ducts
    "vessel", "blood vessel", "artery", "arteriole", "vein", "venule", "capillary", "lymphatic",
    "lymphatic vessel", "sinusoid", "central vein", "portal vein", "hepatic artery", "portal tract",
    "duct", "ductule", "bile duct", "bile ductule", "lactiferous duct", "collecting duct",
    # glands, lobules, functional units
    "gland", "lobule", "hepatic lobule", "acinus", "terminal duct lobular unit", "tubule",
    "renal tubule", "seminiferous tubule", "glomerulus", "alveolus", "alveolar septum", "bronchus",
    "bronchiole", "crypt", "villus", "islet", "islet of langerhans", "follicle", "lymphoid follicle",
    "germinal center", "mantle zone", "primordial follicle", "primary follicle", "secondary follicle",
    "graafian follicle", "atretic follicle", "thyroid follicle", "corpus albicans", "corpus luteum",
    "corpus amylaceum", "corpus arenaceum", "ovum", "oocyte", "red pulp", "white pulp", "hair follicle",
    "sebaceous gland", "sweat gland", "eccrine gland", "apocrine gland", "mucous gland", "serous gland",
    "minor salivary gland", "chorionic villus", "placental villus", "rete testis", "epididymis",
    "vas deferens", "seminal vesicle", "ejaculatory duct", "transition zone", "peripheral zone",
    "central zone", "lower uterine segment", "squamocolumnar junction", "transformation zone",
    "zona glomerulosa", "zona fasciculata", "zona reticularis", "meninges", "white matter",
    "gray matter", "choroid plexus",
    # organs and sites
    "adrenal gland", "bladder", "urinary bladder", "breast", "mammary gland", "liver", "lung", "pleura",
    "ovary", "pancreas", "prostate", "testis", "thyroid", "thyroid gland", "parathyroid", "uterus",
    "cervix", "endocervix", "ectocervix", "fallopian tube", "vagina", "vulva", "placenta",
    "umbilical cord", "kidney", "renal cortex", "renal medulla", "renal pelvis", "ureter", "urethra",
    "penis", "skin", "brain", "cerebellum", "spinal cord", "pituitary", "heart", "myocardium",
    "endocardium", "epicardium", "pericardium", "aorta", "esophagus", "stomach", "gastric antrum",
    "gastric body", "fundus", "duodenum", "jejunum", "ileum", "small intestine", "colon", "large intestine",
    "rectum", "anus", "appendix", "gallbladder", "spleen", "lymph node", "tonsil", "thymus",
    "salivary gland", "parotid", "tongue", "larynx", "trachea", "nasal cavity", "peritoneum",
    "omentum", "mesentery", "retina", "eye", "tibial nerve", "tibial artery", "coronary artery",
)

CELLS: tuple[str, ...] = (
    "epithelial cell", "tumor cell", "neoplastic cell", "malignant cell", "atypical cell",
    "inflammatory cell", "immune cell", "stromal cell", "spindle cell", "epithelioid cell",
    "lymphocyte", "plasma cell", "neutrophil", "eosinophil", "basophil", "mast cell", "monocyte",
    "macrophage", "histiocyte", "foamy macrophage", "foamy histiocyte", "alveolar macrophage",
    "hemosiderin-laden macrophage", "giant cell", "multinucleated giant cell", "foreign body giant cell",
    "langhans giant cell", "osteoclast-like giant cell", "fibroblast", "myofibroblast",
    "endothelial cell", "pericyte", "smooth muscle cell", "adipocyte", "lipoblast", "hepatocyte",
    "kupffer cell", "stellate cell", "cholangiocyte", "pneumocyte", "type i pneumocyte",
    "type ii pneumocyte", "goblet cell", "paneth cell", "parietal cell", "chief cell",
    "neuroendocrine cell", "keratinocyte", "melanocyte", "langerhans cell", "osteoblast", "osteoclast",
    "osteocyte", "chondrocyte", "myocyte", "cardiomyocyte", "neuron", "ganglion cell", "astrocyte",
    "oligodendrocyte", "microglia", "schwann cell", "podocyte", "mesangial cell", "sertoli cell",
    "leydig cell", "spermatogonium", "spermatocyte", "spermatid", "spermatozoon", "germ cell",
    "granulosa cell", "theca cell", "luteal cell", "acinar cell", "islet cell", "beta cell",
    "basal cell", "myoepithelial cell", "squamous cell", "columnar cell", "urothelial cell",
    "umbrella cell", "clear cell", "signet ring cell", "reed-sternberg cell", "megakaryocyte",
    "erythrocyte", "red blood cell", "platelet", "dendritic cell", "b cell", "t cell",
    "natural killer cell", "blast", "trophoblast", "syncytiotrophoblast", "cytotrophoblast",
    "decidual cell", "mesothelial cell", "thyrocyte", "follicular cell", "c cell", "oncocyte",
    "hurthle cell", "apocrine cell", "koilocyte", "decoy cell",
)

ARCHITECTURE: tuple[str, ...] = (
    "gland formation", "glandular architecture", "cribriform pattern", "cribriform gland",
    "papillary architecture", "papilla", "micropapillary pattern", "solid sheet", "sheet", "nest",
    "solid nest", "cord", "trabecula", "trabecular pattern", "acinar pattern", "rosette",
    "palisading", "pseudopalisading", "storiform pattern", "herringbone pattern", "fascicle",
    "whorl", "lobular architecture", "tubule formation", "single file pattern", "lepidic pattern",
    "follicular pattern", "back-to-back gland", "infiltrative border", "pushing border",
    "tumor budding", "perineural invasion", "lymphovascular invasion", "vascular invasion",
    "stromal invasion", "invasion", "desmoplasia", "nodule", "micronodule", "macronodule",
    "adenomatoid nodule", "stromal nodule", "nodularity", "cyst", "microcyst", "colloid cyst",
    "inclusion cyst", "follicular cyst", "crypt abscess", "crypt distortion", "villous blunting",
    "villous atrophy", "honeycombing", "hyaline membrane", "granuloma", "caseating granuloma",
    "non-caseating granuloma", "abscess", "microabscess", "ulcer", "ulceration", "erosion", "fistula",
    "polyp", "adenomatous polyp", "hyperplastic polyp", "mass", "lesion", "tumor", "neoplasm",
    "pseudocyst", "diverticulum", "septum", "lumen", "interface", "margin", "surgical margin",
    "tumor front", "tertiary lymphoid structure", "lymphoid aggregate", "fibrovascular core",
)

CYTOLOGY: tuple[str, ...] = (
    "nucleus", "nucleolus", "prominent nucleolus", "nuclear pleomorphism", "pleomorphism", "atypia",
    "nuclear atypia", "cytologic atypia", "hyperchromasia", "nuclear enlargement",
    "nuclear membrane irregularity", "nuclear groove", "nuclear inclusion", "pseudoinclusion",
    "nuclear overlapping", "nuclear crowding", "chromatin", "vesicular chromatin", "coarse chromatin",
    "mitosis", "mitotic figure", "atypical mitosis", "mitotic activity", "apoptosis", "apoptotic body",
    "karyorrhexis", "pyknosis", "karyolysis", "cytoplasm", "eosinophilic cytoplasm", "clear cytoplasm",
    "granular cytoplasm", "vacuole", "vacuolization", "keratinization", "keratin pearl",
    "intercellular bridge", "multinucleation", "binucleation", "nuclear to cytoplasmic ratio",
    "anisonucleosis", "koilocytosis", "ground glass nucleus", "mallory-denk body", "mallory body",
    "councilman body", "russell body", "dutcher body", "psammoma body", "asteroid body",
    "schaumann body", "michaelis-gutmann body", "call-exner body", "hemosiderin", "lipofuscin",
    "bile", "cholestasis", "bile plug", "melanin", "pigment", "anthracotic pigment", "glycogen",
    "lipid", "lipid droplet", "mucin droplet", "steatosis", "microvesicular steatosis",
    "macrovesicular steatosis", "ballooning", "ballooning degeneration", "fatty change",
    "hyaline globule", "crystal", "cilia", "brush border",
)

DIAGNOSES: tuple[str, ...] = (
    # inflammation and injury
    "inflammation", "acute inflammation", "chronic inflammation", "granulomatous inflammation",
    "lymphocytic infiltrate", "inflammatory infiltrate", "necrosis", "coagulative necrosis",
    "caseous necrosis", "fat necrosis", "fibrinoid necrosis", "liquefactive necrosis", "tumor necrosis",
    "comedonecrosis", "infarct", "infarction", "ischemia", "ischemic change", "hypoxia", "autolysis",
    "degeneration", "edema", "submucosal edema", "pulmonary edema", "congestion",
    "vascular congestion", "chronic passive congestion", "hemorrhage", "thrombus", "thrombosis",
    "embolus", "calcification", "dystrophic calcification", "microcalcification", "amyloid",
    "amyloidosis", "hyalinization", "hyaline", "sclerosis", "vascular sclerosis", "hyaline sclerosis",
    "arteriosclerosis", "atherosclerosis", "arteriolosclerosis", "vasculitis", "fibrosis",
    "bridging fibrosis", "interstitial fibrosis", "periportal fibrosis", "pericellular fibrosis",
    "stromal fibrosis", "cirrhosis", "micronodular cirrhosis", "macronodular cirrhosis",
    "regressive change", "reactive change", "saponification", "exudate", "abscess formation",
    "infection", "foreign body reaction", "viral cytopathic effect", "fungal hyphae", "bacterium",
    "cytomegalovirus", "herpes simplex virus", "human papillomavirus", "helicobacter pylori",
    "candida", "aspergillus", "pneumocystis", "mycobacterium", "parasite",
    # organ diseases
    "hepatitis", "chronic hepatitis", "acute hepatitis", "steatohepatitis", "cholangitis",
    "emphysema", "atelectasis", "pneumonia", "bronchopneumonia", "aspiration pneumonia",
    "pneumonitis", "interstitial pneumonitis", "diffuse alveolar damage", "bronchiectasis",
    "asthma", "tuberculosis", "sarcoidosis", "thyroiditis", "hashimoto thyroiditis",
    "lymphocytic thyroiditis", "goiter", "multinodular goiter", "graves disease", "prostatitis",
    "chronic prostatitis", "cystitis", "chronic cystitis", "cervicitis", "endometritis",
    "endometriosis", "adenomyosis", "gastritis", "chronic gastritis", "colitis", "ulcerative colitis",
    "crohn disease", "celiac disease", "esophagitis", "barrett esophagus", "appendicitis",
    "cholecystitis", "pancreatitis", "chronic pancreatitis", "mastitis", "gynecomastia",
    "fibrocystic change", "mastopathy", "fibrous mastopathy", "sclerosing adenosis", "adenosis",
    "microadenosis", "glomerulosclerosis", "glomerulonephritis", "nephrosclerosis",
    "acute tubular necrosis", "pyelonephritis", "myocarditis", "myocardial infarction",
    "spermatogenesis", "maturation arrest", "hypospermatogenesis", "sertoli cell only",
    "tubular atrophy", "glandular atrophy", "atrophy", "postmenopausal atrophy", "hypertrophy",
    "hyperplasia", "atypical hyperplasia", "glandular hyperplasia", "stromal hyperplasia",
    "nodular hyperplasia", "benign prostatic hyperplasia", "endometrial hyperplasia",
    "atypical ductal hyperplasia", "usual ductal hyperplasia", "lobular hyperplasia",
    "atypical lobular hyperplasia", "follicular hyperplasia", "hyperkeratosis", "parakeratosis",
    "acanthosis", "spongiosis", "dermatitis", "psoriasis", "metaplasia", "squamous metaplasia",
    "intestinal metaplasia", "apocrine metaplasia", "dysplasia", "low-grade dysplasia",
    "high-grade dysplasia", "intraepithelial neoplasia", "prostatic intraepithelial neoplasia",
    "cervical intraepithelial neoplasia",
    # neoplasms
    "neoplasia", "carcinoma in situ", "ductal carcinoma in situ", "lobular carcinoma in situ",
    "carcinoma", "adenocarcinoma", "acinar adenocarcinoma", "squamous cell carcinoma",
    "basal cell carcinoma", "urothelial carcinoma", "hepatocellular carcinoma", "cholangiocarcinoma",
    "renal cell carcinoma", "clear cell renal cell carcinoma", "papillary renal cell carcinoma",
    "chromophobe renal cell carcinoma", "papillary carcinoma", "papillary thyroid carcinoma",
    "follicular carcinoma", "medullary carcinoma", "anaplastic carcinoma",
    "invasive ductal carcinoma", "invasive lobular carcinoma", "invasive carcinoma",
    "small cell carcinoma", "large cell carcinoma", "neuroendocrine tumor", "neuroendocrine carcinoma",
    "carcinoid", "serous carcinoma", "mucinous carcinoma", "endometrioid carcinoma",
    "metastatic carcinoma", "metastasis", "micrometastasis", "adenoma", "tubular adenoma",
    "villous adenoma", "tubulovillous adenoma", "serrated adenoma", "follicular adenoma",
    "hepatocellular adenoma", "pleomorphic adenoma", "fibroadenoma", "phyllodes tumor", "papilloma",
    "intraductal papilloma", "cystadenoma", "lymphoma", "hodgkin lymphoma",
    "diffuse large b-cell lymphoma", "follicular lymphoma", "leukemia", "myeloma", "melanoma",
    "nevus", "sarcoma", "leiomyoma", "leiomyosarcoma", "liposarcoma", "lipoma", "fibroma",
    "angiosarcoma", "hemangioma", "osteosarcoma", "chondrosarcoma", "rhabdomyosarcoma",
    "gastrointestinal stromal tumor", "mesothelioma", "glioma", "glioblastoma", "astrocytoma",
    "oligodendroglioma", "meningioma", "schwannoma", "neurofibroma", "seminoma", "germ cell tumor",
    "teratoma", "yolk sac tumor", "choriocarcinoma", "wilms tumor", "neuroblastoma", "thymoma",
    "pheochromocytoma", "adrenal cortical adenoma", "granulosa cell tumor", "brenner tumor",
)

GRADES: tuple[str, ...] = (
    "well differentiated", "moderately differentiated", "poorly differentiated", "undifferentiated",
    "low grade", "high grade", "gleason pattern", "gleason score", "grade group", "nottingham grade",
    "tumor grade", "postmenopausal", "premenopausal", "proliferative phase", "secretory phase",
    "menstrual phase", "in situ",
)

STAINS: tuple[str, ...] = (
    "h&e", "hematoxylin and eosin", "hematoxylin", "eosin", "periodic acid-schiff", "pas",
    "pas-diastase", "trichrome", "masson trichrome", "reticulin", "iron stain", "prussian blue",
    "congo red", "alcian blue", "mucicarmine", "grocott methenamine silver", "ziehl-neelsen",
    "acid-fast bacilli", "gram stain", "giemsa", "elastic stain", "verhoeff-van gieson", "oil red o",
    "immunohistochemistry", "immunostain", "in situ hybridization", "ki-67", "p53", "p63", "p16",
    "ck7", "ck20", "cytokeratin", "her2", "estrogen receptor", "progesterone receptor", "ttf-1",
    "cd3", "cd4", "cd8", "cd20", "cd30", "cd31", "cd34", "cd45", "cd68", "cd117", "s100", "sox10",
    "desmin", "smooth muscle actin", "vimentin", "synaptophysin", "chromogranin", "pd-l1",
    "e-cadherin", "psa", "gata3", "cdx2", "wt1", "mlh1", "msh2", "msh6", "pms2", "napsin a",
    "thyroglobulin", "calretinin", "inhibin", "mart-1", "hmb-45", "amacr", "racemase",
)

TERMS: dict[str, tuple[str, ...]] = {
    "tissue": TISSUES,
    "cell": CELLS,
    "architecture": ARCHITECTURE,
    "cytology": CYTOLOGY,
    "diagnosis": DIAGNOSES,
    "grade": GRADES,
    "stain": STAINS,
}

#: Surface forms (lowercase, hyphens as spaces) that map to a canonical term.
ALIASES: dict[str, str] = {
    "adipose": "adipose tissue",
    "fibroadipose": "fibroadipose tissue",
    "fatty tissue": "adipose tissue",
    "h e": "h&e",
    "h & e": "h&e",
    "h and e": "h&e",
    "hematoxylin eosin": "hematoxylin and eosin",
    "post menopausal": "postmenopausal",
    "pre menopausal": "premenopausal",
    "tdlu": "terminal duct lobular unit",
    "terminal ductal lobular unit": "terminal duct lobular unit",
    "bph": "benign prostatic hyperplasia",
    "dcis": "ductal carcinoma in situ",
    "lcis": "lobular carcinoma in situ",
    "idc": "invasive ductal carcinoma",
    "ilc": "invasive lobular carcinoma",
    "hcc": "hepatocellular carcinoma",
    "rcc": "renal cell carcinoma",
    "ccrcc": "clear cell renal cell carcinoma",
    "scc": "squamous cell carcinoma",
    "bcc": "basal cell carcinoma",
    "dlbcl": "diffuse large b-cell lymphoma",
    "gist": "gastrointestinal stromal tumor",
    "hgpin": "prostatic intraepithelial neoplasia",
    "cin": "cervical intraepithelial neoplasia",
    "nash": "steatohepatitis",
    "papillary ca": "papillary carcinoma",
    "occult papillary ca": "papillary carcinoma",
    "hashimoto": "hashimoto thyroiditis",
    "hashimoto disease": "hashimoto thyroiditis",
    "graves": "graves disease",
    "crohn": "crohn disease",
    "ki67": "ki-67",
    "mib 1": "ki-67",
    "her 2": "her2",
    "er positive": "estrogen receptor",
    "pr positive": "progesterone receptor",
    "sma": "smooth muscle actin",
    "gms": "grocott methenamine silver",
    "afb": "acid-fast bacilli",
    "ihc": "immunohistochemistry",
    "pas d": "pas-diastase",
    "dpas": "pas-diastase",
    "evg": "verhoeff-van gieson",
    "mitotic figures": "mitotic figure",
    "nc ratio": "nuclear to cytoplasmic ratio",
    "n c ratio": "nuclear to cytoplasmic ratio",
    "nuclear cytoplasmic ratio": "nuclear to cytoplasmic ratio",
    "fungal hypha": "fungal hyphae",
    "ovarian follicle": "follicle",
    "ductal unit": "terminal duct lobular unit",
    "islets of langerhans": "islet of langerhans",
    "lymph gland": "lymph node",
    "hyaline membranes": "hyaline membrane",
    "sertoli cell only syndrome": "sertoli cell only",
    "urinary tract": "bladder",
    "mammary tissue": "breast",
    "breast tissue": "breast",
}

#: Token-level spelling variants (British -> American; common misspellings in notes).
SPELLING: dict[str, str] = {
    "tumour": "tumor", "tumours": "tumors", "haemorrhage": "hemorrhage", "haemorrhagic": "hemorrhagic",
    "oedema": "edema", "oedematous": "edematous", "haematoxylin": "hematoxylin",
    "haemosiderin": "hemosiderin", "oesophagus": "esophagus", "oesophageal": "esophageal",
    "oestrogen": "estrogen", "leukaemia": "leukemia", "haemangioma": "hemangioma",
    "ischaemia": "ischemia", "ischaemic": "ischemic", "centre": "center", "centres": "centers",
    "foetal": "fetal", "anaemia": "anemia", "coeliac": "celiac", "gynaecomastia": "gynecomastia",
    "haematoma": "hematoma", "paediatric": "pediatric", "oestrogens": "estrogens",
    "colour": "color", "grey": "gray", "fibre": "fiber", "fibres": "fibers", "goitre": "goiter",
    "localised": "localized", "autolysed": "autolyzed", "hyalinised": "hyalinized",
    "keratinising": "keratinizing", "vacuolisation": "vacuolization", "hyalinisation": "hyalinization",
    "crohns": "crohn", "atalectasis": "atelectasis", "emphasymatous": "emphysematous",
    "macovesicular": "macrovesicular", "prostatits": "prostatitis", "steatotis": "steatosis",
    "saponifcation": "saponification", "endomterium": "endometrium", "myometium": "myometrium",
    "centrolobular": "centrilobular",
}

#: Latin/Greek and other irregular plurals, token level (including adjectives agreeing with them).
IRREGULAR_PLURALS: dict[str, str] = {
    "nuclei": "nucleus", "nucleoli": "nucleolus", "foci": "focus", "bronchi": "bronchus",
    "bronchioli": "bronchiolus", "glomeruli": "glomerulus", "alveoli": "alveolus", "villi": "villus",
    "acini": "acinus", "emboli": "embolus", "thrombi": "thrombus", "calculi": "calculus",
    "bacilli": "bacillus", "cocci": "coccus", "fungi": "fungus", "sulci": "sulcus", "gyri": "gyrus",
    "lumina": "lumen", "ova": "ovum", "corpora": "corpus", "albicantia": "albicans", "lutea": "luteum",
    "amylacea": "amylaceum", "arenacea": "arenaceum", "stomata": "stoma", "septa": "septum",
    "epithelia": "epithelium", "endothelia": "endothelium", "diverticula": "diverticulum",
    "ostia": "ostium", "bacteria": "bacterium", "papillae": "papilla", "lacunae": "lacuna",
    "vertebrae": "vertebra", "plicae": "plica", "fimbriae": "fimbria", "mucosae": "mucosa",
    "serosae": "serosa", "lamellae": "lamella", "hyphae": "hypha", "trabeculae": "trabecula",
    "testes": "testis", "apices": "apex", "cortices": "cortex", "matrices": "matrix",
    "appendices": "appendix", "indices": "index", "cervices": "cervix", "criteria": "criterion",
    "ganglia": "ganglion", "mitochondria": "mitochondrion", "spermatozoa": "spermatozoon",
    "spermatogonia": "spermatogonium", "phenomena": "phenomenon", "carcinomata": "carcinoma",
    "sarcomata": "sarcoma", "adenomata": "adenoma", "stromata": "stroma", "teeth": "tooth",
    "children": "child", "women": "woman", "men": "man", "mice": "mouse", "feet": "foot",
    "cilia": "cilia", "data": "data", "media": "media", "intima": "intima", "meninges": "meninges",
    "lymphomata": "lymphoma", "tdlus": "tdlu",
}

#: Words ending in "s" that are already singular (or have no singular).
INVARIANT: frozenset[str] = frozenset({
    "pancreas", "atlas", "gas", "canvas", "lens", "series", "species", "diabetes", "herpes",
    "ascites", "measles", "mumps", "scabies", "rabies", "feces", "menses", "news", "physics",
    "mellitus", "lupus", "status", "corpus", "uterus", "fetus", "sinus", "villus", "virus", "fungus",
    "nucleus", "nucleolus", "bronchus", "thrombus", "embolus", "calculus", "glomerulus", "alveolus",
    "acinus", "focus", "plexus", "meatus", "hiatus", "isthmus", "fundus", "humerus", "stratus",
    "albicans", "iris", "pelvis", "testis", "cervix", "bias", "biceps", "triceps",
    "metastasis", "analysis", "diagnosis", "prognosis", "basis", "axis", "this", "its", "was", "has",
    "is", "as", "us", "thus", "plus", "yes", "less", "unless", "chorionic", "graves", "pas",
    "langerhans", "mucus", "pus", "mitosis", "vas", "deferens",
})

#: Pathology adjectives: modifiers that make a noun phrase informative.
MODIFIERS: frozenset[str] = frozenset({
    "acute", "chronic", "active", "granulomatous", "ductal", "lobular", "glandular", "stromal",
    "epithelial", "interstitial", "alveolar", "bronchial", "vascular", "perivascular", "periportal",
    "portal", "centrilobular", "papillary", "follicular", "medullary", "cortical", "subcapsular",
    "submucosal", "mucosal", "serous", "mucinous", "squamous", "columnar", "cuboidal", "basal",
    "apocrine", "sebaceous", "fibrous", "fibrotic", "sclerotic", "hyaline", "hyalinized", "cystic",
    "microcystic", "fibrocystic", "atrophic", "hyperplastic", "dysplastic", "metaplastic",
    "neoplastic", "malignant", "benign", "invasive", "infiltrating", "infiltrative", "metastatic",
    "atypical", "reactive", "inflammatory", "necrotic", "hemorrhagic", "edematous", "congested",
    "ischemic", "emphysematous", "macrovesicular", "microvesicular", "micronodular", "macronodular",
    "nodular", "bridging", "intestinal", "lymphocytic", "lymphoplasmacytic", "neutrophilic",
    "eosinophilic", "histiocytic", "plasmacytic", "postmenopausal", "secretory", "proliferative",
    "endometrial", "endocervical", "prostatic", "pancreatic", "peripancreatic", "hepatic", "renal",
    "pulmonary", "adrenal", "mammary", "ovarian", "testicular", "uterine", "cervical", "colonic",
    "gastric", "esophageal", "cutaneous", "dermal", "epidermal", "seminiferous", "tubular",
    "glomerular", "biliary", "parenchymal", "myometrial", "urothelial", "mesothelial", "neural",
    "perineural", "lymphovascular", "lymphoid", "myeloid", "multinucleated", "foamy", "clear",
    "granular", "spindle", "epithelioid", "pleomorphic", "anaplastic", "keratinizing", "fatty",
    "steatotic", "cirrhotic", "fibroadipose", "adipose", "muscular",
    "thyroid", "gynecomastoid", "adenomatoid", "cribriform", "solid", "trabecular", "acinar",
    "lepidic", "micropapillary", "hemosiderotic", "calcified", "ulcerated", "denuded", "eroded",
    "hyperchromatic", "vesicular", "mitotic", "apoptotic", "ballooned", "regressive", "involuted",
    "luteinized", "decidualized", "apical", "luminal", "intraluminal", "intraductal", "periductal",
    "perilobular", "intralobular", "interlobular", "pericellular", "perisinusoidal", "sinusoidal",
    "passive", "ciliated", "keratinized", "ductular",
})

#: Adjectives naming a process: they also yield the process term (``steatotic`` -> ``steatosis``).
ADJ_TO_TERM: dict[str, str] = {
    "steatotic": "steatosis", "congested": "congestion", "fibrotic": "fibrosis", "atrophic": "atrophy",
    "hyperplastic": "hyperplasia", "cirrhotic": "cirrhosis", "necrotic": "necrosis",
    "edematous": "edema", "calcified": "calcification", "sclerotic": "sclerosis",
    "autolyzed": "autolysis", "autolytic": "autolysis", "hyalinized": "hyalinization",
    "inflamed": "inflammation", "hemorrhagic": "hemorrhage", "emphysematous": "emphysema",
    "atelectatic": "atelectasis", "metaplastic": "metaplasia", "dysplastic": "dysplasia",
    "ischemic": "ischemia", "infarcted": "infarction", "ulcerated": "ulceration",
    "hypertrophic": "hypertrophy", "amyloidotic": "amyloidosis", "thrombosed": "thrombosis",
    "granulomatous": "granuloma", "metastatic": "metastasis", "saponified": "saponification",
    "keratinizing": "keratinization", "vacuolated": "vacuolization", "apoptotic": "apoptosis",
    "mitotic": "mitosis", "gynecomastoid": "gynecomastia",
}

#: Extent, severity and certainty words: dropped from the start of phrases, never keywords.
QUALIFIERS: frozenset[str] = frozenset({
    "mild", "moderate", "severe", "marked", "focal", "diffuse", "patchy", "extensive", "minimal",
    "minute", "slight", "prominent", "pronounced", "early", "late", "established", "remote", "recent",
    "rare", "occasional", "few", "several", "numerous", "many", "multiple", "scattered", "abundant",
    "small", "large", "significant", "normal", "typical", "residual", "possible", "probable",
    "suspected", "apparent", "evident", "trace", "isolated", "frequent", "increased", "decreased",
    "reduced", "complete", "partial", "total", "mixed", "dense", "background", "good", "poor",
    "excellent", "fair", "adequate", "inadequate", "unremarkable", "remarkable", "viable", "intact",
    "visible", "various", "variable", "central", "peripheral", "superficial", "deep", "entire",
    "whole", "overall", "predominant", "predominantly", "mainly", "mostly", "largely", "exuberant",
    "occult", "old", "new", "thick", "thin", "minor", "major", "tiny", "huge", "big", "little",
    "postmortem", "autopsy", "surprising", "unusual", "extreme", "clean", "dominant", "sparse",
    "relative", "absolute", "approximate", "maximal", "maximum", "minimum", "average", "adjacent",
    "admixed", "attached", "appended", "contaminating", "intermingled", "interspersed", "unfixed",
    "fixed", "preserved", "degraded", "sloughed", "broken", "fragmented", "oversized", "undersized",
    "underfixed", "under", "subtotal", "entrapped", "other", "same", "different", "further",
    "additional", "consistent", "compatible", "suggestive", "concerning", "characteristic",
    "absent", "persistent", "recurrent", "transient", "latent", "dependent", "independent",
    "distant", "relevant", "underlying", "overlying", "remaining", "following", "existing",
    "missing", "resulting", "ongoing", "present", "limited", "sufficient", "insufficient", "mod",
    "deeper", "larger", "smaller", "thicker", "thinner", "greater", "lesser", "higher", "lower",
    "upper", "inner", "outer", "earlier", "later", "older", "newer", "shorter", "longer", "wider",
    "high", "low", "positive", "negative", "weak", "strong", "equivocal", "focally", "diffusely",
})

#: Nouns too generic to be keywords alone; they head a phrase only with a pathology modifier
#: (``ductal element``, ``fibrocystic change``).
GENERIC_NOUNS: frozenset[str] = frozenset({
    "area", "part", "portion", "region", "component", "element", "structure", "change", "feature",
    "material", "appearance", "presence", "absence", "evidence", "finding", "field", "focus",
    "pattern", "degree", "stage", "grade", "level", "zone", "layer", "unit", "tissue", "content",
    "process", "form", "formation", "sign", "figure", "picture", "state", "condition", "effect",
    "morphology", "histology", "architecture", "type", "kind", "site", "location", "surface",
})

#: Specimen-handling words: never keywords and never the head of a phrase.
ADMIN_NOUNS: frozenset[str] = frozenset({
    "piece", "aliquot", "specimen", "sample", "edge", "side", "section", "slide", "image", "review",
    "analysis", "quality", "case", "one", "rest", "remainder", "lot", "number", "amount", "percent",
    "size", "thickness", "fragment", "end", "pole", "segment", "time", "score", "view",
    "preservation", "fixation", "artifact", "artefact", "sequence", "cm", "mm", "glass", "block",
    "cassette", "base", "lid", "dome", "note", "comment", "direction", "extent", "proportion",
    "fraction", "majority", "minority", "bit", "way", "sort", "thing", "item", "patient", "subject",
    "donor", "autopsy", "person", "category", "measurement", "dimension", "diameter", "length",
    "width", "height", "depth", "quantity", "total", "maximum", "minimum", "average",
})

#: Function words: they end a noun phrase and are never keywords.
STOPWORDS: frozenset[str] = frozenset({
    "a", "an", "the", "and", "or", "nor", "but", "of", "in", "on", "at", "to", "for", "from", "by",
    "with", "without", "within", "into", "onto", "upon", "over", "under", "between", "among",
    "through", "throughout", "across", "along", "around", "about", "above", "below", "beneath",
    "beside", "besides", "near", "next", "than", "then", "as", "like", "unlike", "per", "via", "vs",
    "versus", "v", "&", "this", "that", "these", "those", "there", "here", "where", "when", "which",
    "who", "whom", "whose", "what", "while", "whereas", "if", "so", "such", "no", "not", "none",
    "nil", "any", "some", "all", "both", "each", "every", "either", "neither", "only", "also", "too",
    "very", "more", "most", "less", "least", "much", "same", "own", "it", "its", "they", "them",
    "their", "we", "our", "i", "he", "she", "his", "her", "you", "your", "one", "two", "three", "four",
    "five", "six", "seven", "eight", "nine", "ten", "first", "second", "third", "half", "quarter",
    "ok", "okay", "yes", "etc", "eg", "ie", "re", "ave", "avg", "approx", "approximately", "ca",
    "up", "upto", "out", "off", "down", "just", "still", "even", "yet", "already", "again", "else",
    "well", "however", "although", "though", "because", "since", "until", "unless", "whether",
    "due", "rather", "quite", "somewhat", "fairly", "highly", "slightly", "mostly", "partly",
    "other", "another", "others", "rest", "remainder", "few", "x", "sq", "cf",
    "post", "pre", "non", "sub", "semi", "micro", "macro", "ante", "anti", "mortem", "rep", "inside",
    "outside", "beyond", "behind", "against", "toward", "towards", "despite", "except", "apart",
})

#: Verbs and verb-like words (auxiliaries, reporting verbs): they end a noun phrase.
VERBS: frozenset[str] = frozenset({
    "is", "are", "was", "were", "be", "been", "being", "am", "has", "have", "had", "having", "do",
    "does", "did", "done", "can", "cannot", "could", "should", "would", "may", "might", "will",
    "shall", "must", "show", "shows", "showed", "shown", "showing", "contain", "contains",
    "contained", "containing", "appear", "appears", "appeared", "appearing", "measure", "measures",
    "measured", "measuring", "note", "noted", "notes", "see", "seen", "sees", "saw", "identify",
    "identified", "observe", "observed", "present", "presents", "consistent", "compatible",
    "suggest", "suggests", "suggested", "suggesting", "suggestive", "favor", "favors", "favored",
    "represent", "represents", "represented", "involve", "involves", "involved", "involving",
    "include", "includes", "included", "including", "look", "looks", "looked", "looking", "used",
    "use", "uses", "using", "correspond", "corresponds", "corresponding", "confirm", "confirmed",
    "pending", "monitor", "evaluate", "evaluated", "evaluable", "become", "becomes", "became",
    "remain", "remains", "remained", "seem", "seems", "seemed", "occur", "occurs", "occurred",
    "exist", "exists", "lack", "lacks", "lacking", "extend", "extends", "extending", "surround",
    "surrounds", "surrounding", "approach", "approaching", "encircled", "delineated", "squared",
    "refix", "recut", "analyze", "analyse", "get", "gets", "got", "make", "makes", "made", "take",
    "taken", "give", "given", "sampled", "submitted", "received", "obtained", "examined", "unable",
    "able", "need", "needs", "needed", "require", "requires", "required", "find", "found", "rule",
    "exclude", "excluded", "cut", "stained", "reviewed", "demonstrate", "demonstrates",
    "demonstrated", "demonstrating", "reveal", "reveals", "revealed", "exhibit", "exhibits",
    "display", "displays", "composed", "consist", "consists", "consisting", "comprise", "comprises",
    "comprising", "arising", "arise", "arises", "associated", "according", "based", "regarding",
})

#: Measurement units: they end a noun phrase.
UNITS: frozenset[str] = frozenset({
    "mm", "cm", "um", "nm", "m", "micron", "microns", "micrometer", "micrometers", "millimeter",
    "millimeters", "centimeter", "centimeters", "hpf", "lpf", "x", "g", "mg", "kg", "ml", "l",
    "percent", "pct",
})

#: Words ending in -al/-ic/-ar... that are nouns all the same.
NOUN_EXCEPTIONS: frozenset[str] = frozenset({
    "material", "canal", "interval", "signal", "hospital", "crystal", "arsenal", "petal", "mammal",
    "clinic", "logic", "topic", "scar", "sugar", "collar", "pillar", "bed", "seed", "need",
    "hundred", "tissue", "marrow", "colloid", "steroid", "keloid", "amyloid", "osteoid",
    "carcinoid", "lymphoid", "ganglion", "individual", "vital", "interstitium", "capital",
    "proposal", "removal", "renewal", "arrival", "survival", "referral", "trial", "anomaly",
    "family", "assembly", "supply", "belly", "jelly", "boundary", "summary", "library", "diary",
    "glossary", "ovary", "capillary", "artery",
})


def all_terms() -> dict[str, str]:
    """Every canonical term mapped to its category."""
    out: dict[str, str] = {}
    for category, terms in TERMS.items():
        for term in terms:
            out.setdefault(term, category)
    return out
