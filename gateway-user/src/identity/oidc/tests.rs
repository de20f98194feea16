//! Tests for token validation, JWKS loading and token files. Keys and
//! certificates are generated at test time; every HTTPS server listens on
//! 127.0.0.1 only.

use std::{
    collections::HashSet,
    convert::Infallible,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
};

use aws_lc_rs::{
    encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der},
    rsa::KeySize,
    signature::{
        EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING,
        ECDSA_P384_SHA384_FIXED_SIGNING,
    },
};
use base64::engine::general_purpose::STANDARD;
use http_body_util::Full;
use hyper::{body::Bytes, Response};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;

use super::*;

const ISS: &str = "https://issuer.example";
const AUD: &str = "portcullis";
const SUBJECT: &str = "billing-agent";

// ---------------------------------------------------------------- helpers

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "portcullis-oidc-{tag}-{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Replaces `path` atomically, as a rotating writer does.
fn write_by_rename(path: &Path, content: &[u8]) {
    let tmp = path.with_extension("tmp-rotate");
    fs::write(&tmp, content).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// A signing key and its public JWK.
#[derive(Clone)]
struct TestKey {
    kid: String,
    alg: Algorithm,
    enc: EncodingKey,
    jwk: Value,
    /// SPKI PEM of an RSA key (the bytes an HS/RS confusion attack uses).
    public_pem: Option<String>,
}

impl TestKey {
    /// The same key under another kid.
    fn with_kid(&self, kid: &str) -> Self {
        let mut k = self.clone();
        k.kid = kid.to_string();
        k.jwk["kid"] = json!(kid);
        k
    }

    /// The same key signing with another (compatible) algorithm.
    fn with_alg(&self, alg: Algorithm) -> Self {
        let mut k = self.clone();
        k.alg = alg;
        k
    }
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Reads one DER TLV: (tag, content, rest).
fn der_tlv(input: &[u8]) -> (u8, &[u8], &[u8]) {
    let tag = input[0];
    let first = input[1] as usize;
    let (len, header) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        let len = input[2..2 + n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, 2 + n)
    };
    (tag, &input[header..header + len], &input[header + len..])
}

/// The PKCS#1 RSAPrivateKey inside a PKCS#8 PrivateKeyInfo (what
/// jsonwebtoken's RSA signer takes).
fn pkcs8_to_pkcs1(pkcs8: &[u8]) -> Vec<u8> {
    let (_, info, _) = der_tlv(pkcs8);
    let (_, _version, rest) = der_tlv(info);
    let (_, _alg_id, rest) = der_tlv(rest);
    let (tag, key, _) = der_tlv(rest);
    assert_eq!(tag, 0x04, "PKCS#8 private key is an OCTET STRING");
    key.to_vec()
}

fn make_rsa(kid: &str) -> TestKey {
    let kp = aws_lc_rs::rsa::KeyPair::generate(KeySize::Rsa2048).unwrap();
    let pkcs8: Pkcs8V1Der = kp.as_der().unwrap();
    let public = kp.public_key();
    let spki: PublicKeyX509Der = public.as_der().unwrap();
    let body = STANDARD.encode(spki.as_ref());
    let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap());
        pem.push('\n');
    }
    pem.push_str("-----END PUBLIC KEY-----\n");
    TestKey {
        kid: kid.to_string(),
        alg: Algorithm::RS256,
        enc: EncodingKey::from_rsa_der(&pkcs8_to_pkcs1(pkcs8.as_ref())),
        jwk: json!({
            "kty": "RSA",
            "use": "sig",
            "kid": kid,
            "n": b64(public.modulus().big_endian_without_leading_zero()),
            "e": b64(public.exponent().big_endian_without_leading_zero()),
        }),
        public_pem: Some(pem),
    }
}

/// RSA key generation is slow without optimisation: three keys, made once.
fn rsa(which: usize) -> TestKey {
    static KEYS: OnceLock<Vec<TestKey>> = OnceLock::new();
    KEYS.get_or_init(|| vec![make_rsa("rsa-1"), make_rsa("rsa-2"), make_rsa("rsa-forger")])[which]
        .clone()
}

fn make_ec(kid: &str, p384: bool) -> TestKey {
    let (alg, signing, crv, len) = if p384 {
        (
            Algorithm::ES384,
            &ECDSA_P384_SHA384_FIXED_SIGNING,
            "P-384",
            48,
        )
    } else {
        (
            Algorithm::ES256,
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            "P-256",
            32,
        )
    };
    let kp = EcdsaKeyPair::generate(signing).unwrap();
    let pkcs8 = kp.to_pkcs8v1().unwrap();
    let point = kp.public_key().as_ref().to_vec();
    assert_eq!(point.len(), 1 + 2 * len);
    TestKey {
        kid: kid.to_string(),
        alg,
        enc: EncodingKey::from_ec_der(pkcs8.as_ref()),
        jwk: json!({
            "kty": "EC",
            "crv": crv,
            "kid": kid,
            "x": b64(&point[1..1 + len]),
            "y": b64(&point[1 + len..]),
        }),
        public_pem: None,
    }
}

fn make_ed(kid: &str) -> TestKey {
    let kp = Ed25519KeyPair::generate().unwrap();
    let pkcs8 = kp.to_pkcs8().unwrap();
    TestKey {
        kid: kid.to_string(),
        alg: Algorithm::EdDSA,
        enc: EncodingKey::from_ed_der(pkcs8.as_ref()),
        jwk: json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "kid": kid,
            "x": b64(kp.public_key().as_ref()),
        }),
        public_pem: None,
    }
}

fn jwks(keys: &[&TestKey]) -> String {
    json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() }).to_string()
}

fn now() -> u64 {
    unix_now()
}

/// Valid claims for `subject`.
fn claims_for(subject: &str) -> Value {
    json!({
        "iss": ISS,
        "aud": AUD,
        "sub": subject,
        "exp": now() + 600,
        "nbf": now() - 5,
        "iat": now() - 5,
        "jti": "token-1",
    })
}

fn claims() -> Value {
    claims_for(SUBJECT)
}

fn sign(key: &TestKey, claims: &Value) -> String {
    let mut header = Header::new(key.alg);
    header.kid = Some(key.kid.clone());
    encode(&header, claims, &key.enc).unwrap()
}

/// A token with a hand-made header and no signature.
fn unsigned(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}.",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    )
}

fn file_config(path: &Path) -> IssuerConfig {
    IssuerConfig::new(
        "corp",
        ISS,
        vec![AUD.to_string()],
        JwksSource::File(path.into()),
    )
}

/// A verifier on a JWKS file holding `keys`, loaded.
async fn file_verifier(dir: &TempDir, keys: &[&TestKey]) -> (Verifier, PathBuf) {
    let path = dir.path("jwks.json");
    fs::write(&path, jwks(keys)).unwrap();
    let v = Verifier::new(file_config(&path)).unwrap();
    v.refresh().await.unwrap();
    (v, path)
}

// ---------------------------------------------------------- token matrix

#[tokio::test]
async fn valid_rs256_es256_es384_eddsa_and_ps256_tokens_are_accepted() {
    let dir = TempDir::new("valid");
    let (rsa1, ec, ec384, ed) = (
        rsa(0),
        make_ec("ec-1", false),
        make_ec("ec-384", true),
        make_ed("ed-1"),
    );
    let (v, _) = file_verifier(&dir, &[&rsa1, &ec, &ec384, &ed]).await;

    for key in [&rsa1, &rsa1.with_alg(Algorithm::PS256), &ec, &ec384, &ed] {
        let mut c = claims();
        c["aud"] = json!(["someone-else", AUD]);
        c["team"] = json!("payments");
        let token = sign(key, &c);
        let got = v.validate(&token, SUBJECT).await.unwrap_or_else(|e| {
            panic!("{:?} token refused: {e}", key.alg);
        });
        assert_eq!(got.iss, ISS);
        assert_eq!(got.sub, SUBJECT);
        assert_eq!(got.subject, SUBJECT);
        assert_eq!(got.aud, vec!["someone-else".to_string(), AUD.to_string()]);
        assert_eq!(got.exp, c["exp"].as_u64().unwrap());
        assert_eq!(got.nbf, c["nbf"].as_u64());
        assert_eq!(got.iat, c["iat"].as_u64());
        assert_eq!(got.jti.as_deref(), Some("token-1"));
        assert_eq!(got.raw["team"], "payments");
        // The data path gives the same answer without I/O.
        assert_eq!(v.validate_cached(&token, SUBJECT), Ok(got));
    }
}

#[tokio::test]
async fn every_bad_token_is_refused_with_its_own_reason() {
    let dir = TempDir::new("matrix");
    let rsa1 = rsa(0);
    let ec = make_ec("ec-1", false);
    let (v, _) = file_verifier(&dir, &[&rsa1, &ec]).await;

    let without = |claim: &str| {
        let mut c = claims();
        c.as_object_mut().unwrap().remove(claim);
        sign(&rsa1, &c)
    };
    let with = |claim: &str, value: Value| {
        let mut c = claims();
        c[claim] = value;
        sign(&rsa1, &c)
    };
    // HS256 with the RSA public key's PEM as the HMAC secret, naming the RSA
    // key: a verifier taking the algorithm from the header would accept it.
    let pem = rsa1.public_pem.clone().unwrap();
    let mut hs_header = Header::new(Algorithm::HS256);
    hs_header.kid = Some(rsa1.kid.clone());
    let hs_confusion = encode(
        &hs_header,
        &claims(),
        &EncodingKey::from_secret(pem.as_bytes()),
    )
    .unwrap();

    let cases: Vec<(&str, String, TokenError)> = vec![
        (
            "forged signature (another key, same kid)",
            sign(&rsa(2).with_kid("rsa-1"), &claims()),
            TokenError::BadSignature,
        ),
        (
            "expired",
            with("exp", json!(now() - 3600)),
            TokenError::Expired { exp: 0 },
        ),
        (
            "not yet valid",
            with("nbf", json!(now() + 3600)),
            TokenError::NotYetValid { nbf: 0 },
        ),
        (
            "wrong audience",
            with("aud", json!("another-service")),
            TokenError::WrongAudience(String::new()),
        ),
        (
            "wrong issuer",
            with("iss", json!("https://evil.example")),
            TokenError::WrongIssuer(String::new()),
        ),
        (
            "missing aud",
            without("aud"),
            TokenError::MissingClaim("aud".into()),
        ),
        (
            "missing iss",
            without("iss"),
            TokenError::MissingClaim("iss".into()),
        ),
        (
            "missing exp",
            without("exp"),
            TokenError::MissingClaim("exp".into()),
        ),
        (
            "alg none",
            unsigned(&json!({"alg": "none", "kid": "rsa-1"}), &claims()),
            TokenError::AlgorithmNone,
        ),
        (
            "HS256 signed with the RSA public key",
            hs_confusion,
            TokenError::AlgorithmKeyMismatch {
                alg: String::new(),
                key: String::new(),
            },
        ),
        (
            "unknown kid",
            sign(&rsa(1), &claims()),
            TokenError::UnknownKid(String::new()),
        ),
        (
            "subject of another identity",
            sign(&rsa1, &claims_for("reporting-agent")),
            TokenError::SubjectMismatch {
                expected: String::new(),
                found: String::new(),
            },
        ),
    ];

    let mut codes = HashSet::new();
    for (what, token, want) in &cases {
        let got = v.validate(token, SUBJECT).await;
        let Err(err) = got else {
            panic!("{what}: accepted");
        };
        assert_eq!(err.code(), want.code(), "{what}: got {err:?}");
        assert!(codes.insert(err.code()) || matches!(err, TokenError::MissingClaim(_)));
        // The cache-only path refuses for the same reason.
        let cached = v.validate_cached(token, SUBJECT).unwrap_err();
        assert_eq!(
            cached.code(),
            want.code(),
            "{what} (cached): got {cached:?}"
        );
    }
    assert_eq!(codes.len(), cases.len() - 2, "missing_* cases share a code");

    // The details are the token's.
    let expired_at = now() - 3600;
    assert_eq!(
        v.validate(&with("exp", json!(expired_at)), SUBJECT).await,
        Err(TokenError::Expired { exp: expired_at })
    );
    assert_eq!(
        v.validate(&without("aud"), SUBJECT).await,
        Err(TokenError::MissingClaim("aud".into()))
    );
    assert_eq!(
        v.validate(&without("iss"), SUBJECT).await,
        Err(TokenError::MissingClaim("iss".into()))
    );
    assert_eq!(
        v.validate(&without("exp"), SUBJECT).await,
        Err(TokenError::MissingClaim("exp".into()))
    );
    assert_eq!(
        v.validate(&without("sub"), SUBJECT).await,
        Err(TokenError::MissingClaim("sub".into()))
    );
    assert_eq!(
        v.validate(&sign(&rsa1, &claims_for("reporting-agent")), SUBJECT)
            .await,
        Err(TokenError::SubjectMismatch {
            expected: "billing-agent".into(),
            found: "\"reporting-agent\"".into(),
        })
    );
    assert_eq!(
        v.validate(&with("iss", json!("https://evil.example")), SUBJECT)
            .await,
        Err(TokenError::WrongIssuer("\"https://evil.example\"".into()))
    );
    assert_eq!(
        v.validate(&with("aud", json!(["a", "b"])), SUBJECT).await,
        Err(TokenError::WrongAudience("\"a,b\"".into()))
    );
    match v.validate(&cases[9].1, SUBJECT).await {
        Err(TokenError::AlgorithmKeyMismatch { alg, key }) => {
            assert_eq!(alg, "HS256");
            assert!(key.contains("RSA") && key.contains("rsa-1"), "{key}");
        }
        other => panic!("HS/RS confusion: {other:?}"),
    }
}

#[tokio::test]
async fn the_signature_is_checked_before_any_claim() {
    let dir = TempDir::new("sigfirst");
    let rsa1 = rsa(0);
    let (v, _) = file_verifier(&dir, &[&rsa1]).await;
    let forger = rsa(2).with_kid("rsa-1");
    let mut c = claims_for("someone");
    c["exp"] = json!(now() - 3600);
    c["iss"] = json!("https://evil.example");
    c.as_object_mut().unwrap().remove("aud");
    assert_eq!(
        v.validate(&sign(&forger, &c), SUBJECT).await,
        Err(TokenError::BadSignature)
    );
    // A valid signature over a tampered payload.
    let good = sign(&rsa1, &claims());
    let parts: Vec<&str> = good.split('.').collect();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(claims_for("reporting-agent").to_string().as_bytes()),
        parts[2]
    );
    assert_eq!(
        v.validate(&tampered, "reporting-agent").await,
        Err(TokenError::BadSignature)
    );
}

#[tokio::test]
async fn leeway_applies_to_exp_and_nbf() {
    let dir = TempDir::new("leeway");
    let rsa1 = rsa(0);
    let (v, _) = file_verifier(&dir, &[&rsa1]).await;
    let mut c = claims();
    c["exp"] = json!(now() - 10);
    c["nbf"] = json!(now() + 10);
    v.validate(&sign(&rsa1, &c), SUBJECT)
        .await
        .expect("within the 30 s leeway");
    c["exp"] = json!(now() - 90);
    assert_eq!(
        v.validate(&sign(&rsa1, &c), SUBJECT)
            .await
            .unwrap_err()
            .code(),
        "expired"
    );
    // Fractional NumericDates are accepted; strings are not.
    c["exp"] = json!(now() as f64 + 600.5);
    c["nbf"] = json!(1.5);
    let got = v.validate(&sign(&rsa1, &c), SUBJECT).await.unwrap();
    assert_eq!(got.nbf, Some(1));
    c["exp"] = json!("tomorrow");
    assert_eq!(
        v.validate(&sign(&rsa1, &c), SUBJECT).await,
        Err(TokenError::InvalidClaim("exp".into()))
    );
}

#[tokio::test]
async fn the_algorithm_is_the_keys_not_the_headers() {
    let dir = TempDir::new("alg");
    let rsa1 = rsa(0);
    let mut pinned = rsa(1);
    pinned.jwk["alg"] = json!("RS256");
    let ec = make_ec("ec-1", false);
    let (v, _) = file_verifier(&dir, &[&rsa1, &pinned, &ec]).await;

    // A key whose JWK says RS256 does not verify PS256, even if the
    // signature would verify.
    let err = v
        .validate(
            &sign(&pinned.with_alg(Algorithm::PS256), &claims()),
            SUBJECT,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, TokenError::AlgorithmKeyMismatch { ref alg, .. } if alg == "PS256"),
        "{err:?}"
    );
    // An ES256 header naming the RSA key.
    let err = v
        .validate(&sign(&ec.with_kid("rsa-1"), &claims()), SUBJECT)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "alg_key_mismatch");
    // An RS256 header naming the P-256 key.
    let err = v
        .validate(&sign(&rsa1.with_kid("ec-1"), &claims()), SUBJECT)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "alg_key_mismatch");
    // ES384 naming the P-256 key.
    let ec384 = make_ec("ec-1", true);
    let err = v
        .validate(&sign(&ec384, &claims()), SUBJECT)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "alg_key_mismatch");
    // HMAC algorithms are never allowed, whatever the kid.
    let hs = {
        let mut h = Header::new(Algorithm::HS512);
        h.kid = Some("nobody".into());
        encode(&h, &claims(), &EncodingKey::from_secret(b"secret")).unwrap()
    };
    assert_eq!(
        v.validate(&hs, SUBJECT).await,
        Err(TokenError::AlgorithmNotAllowed("HS512".into()))
    );
    // `none` in any case, and unknown names.
    for alg in ["none", "None", "NONE"] {
        let t = unsigned(&json!({"alg": alg, "kid": "rsa-1"}), &claims());
        assert_eq!(
            v.validate(&t, SUBJECT).await,
            Err(TokenError::AlgorithmNone)
        );
    }
    let t = unsigned(&json!({"alg": "ES512", "kid": "ec-1"}), &claims());
    assert_eq!(
        v.validate(&t, SUBJECT).await.unwrap_err().code(),
        "alg_not_allowed"
    );
}

#[tokio::test]
async fn malformed_tokens_and_headers_are_refused() {
    let dir = TempDir::new("malformed");
    let rsa1 = rsa(0);
    let (v, _) = file_verifier(&dir, &[&rsa1]).await;
    let good = sign(&rsa1, &claims());
    let header_part = good.split('.').next().unwrap().to_string();
    let huge = format!("{header_part}.{}.sig", "A".repeat(MAX_TOKEN_BYTES));
    for token in [
        "",
        "not-a-token",
        "a.b",
        "a.b.c.d.e", // JWE compact form
        "!!!.e30.sig",
        &format!("{}.e30.sig", b64(b"[1,2]")),
        &format!("{}.e30.sig", b64(br#"{"kid":"rsa-1"}"#)),
        &format!("{}.e30.sig", b64(br#"{"alg":"RS256","kid":7}"#)),
        &huge,
    ] {
        let err = v.validate(token, SUBJECT).await.unwrap_err();
        assert_eq!(err.code(), "malformed", "{token:.40}: {err:?}");
    }
    // A valid signature over a payload that is not a JSON object.
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("rsa-1".into());
    let array = encode(&h, &json!([1, 2, 3]), &rsa1.enc).unwrap();
    assert_eq!(
        v.validate(&array, SUBJECT).await.unwrap_err().code(),
        "malformed"
    );
    // Critical header extensions are not understood.
    let mut crit = good.split('.').map(str::to_string).collect::<Vec<_>>();
    crit[0] = b64(br#"{"alg":"RS256","kid":"rsa-1","crit":["b64"],"b64":false}"#);
    assert_eq!(
        v.validate(&crit.join("."), SUBJECT)
            .await
            .unwrap_err()
            .code(),
        "critical_header"
    );
    // A signed payload with a duplicated claim: parsers that keep the first
    // and the last value would disagree on the subject. Refused.
    let header = b64(br#"{"alg":"RS256","kid":"rsa-1"}"#);
    let payload = format!(
        r#"{{"iss":"{ISS}","aud":"{AUD}","exp":{},"sub":"reporting-agent","sub":"{SUBJECT}"}}"#,
        now() + 600
    );
    let message = format!("{header}.{}", b64(payload.as_bytes()));
    let signature =
        jsonwebtoken::crypto::sign(message.as_bytes(), &rsa1.enc, Algorithm::RS256).unwrap();
    let duplicated = format!("{message}.{signature}");
    assert_eq!(
        v.validate(&duplicated, SUBJECT).await.unwrap_err().code(),
        "malformed"
    );
    // Wrong claim types.
    let mut c = claims();
    c["aud"] = json!([AUD, 7]);
    assert_eq!(
        v.validate(&sign(&rsa1, &c), SUBJECT).await,
        Err(TokenError::InvalidClaim("aud".into()))
    );
}

#[tokio::test]
async fn tokens_without_kid_need_a_single_fitting_key() {
    let dir = TempDir::new("nokid");
    let rsa1 = rsa(0);
    let ec = make_ec("ec-1", false);
    let (v, path) = file_verifier(&dir, &[&rsa1, &ec]).await;
    let no_kid = |key: &TestKey| encode(&Header::new(key.alg), &claims(), &key.enc).unwrap();
    // One RSA key and one EC key: each algorithm has one candidate.
    v.validate(&no_kid(&rsa1), SUBJECT).await.unwrap();
    v.validate(&no_kid(&ec), SUBJECT).await.unwrap();
    // Two RSA keys: ambiguous.
    write_by_rename(&path, jwks(&[&rsa1, &rsa(1), &ec]).as_bytes());
    v.refresh().await.unwrap();
    assert_eq!(
        v.validate(&no_kid(&rsa1), SUBJECT).await,
        Err(TokenError::MissingKid)
    );
    // No Ed25519 key at all.
    assert_eq!(
        v.validate(&no_kid(&make_ed("x")), SUBJECT)
            .await
            .unwrap_err()
            .code(),
        "alg_key_mismatch"
    );
}

#[tokio::test]
async fn subject_claim_can_be_nested() {
    let dir = TempDir::new("subject");
    let rsa1 = rsa(0);
    let path = dir.path("jwks.json");
    fs::write(&path, jwks(&[&rsa1])).unwrap();
    let mut cfg = file_config(&path);
    cfg.subject_claim = "/kubernetes.io/serviceaccount/name".into();
    let v = Verifier::new(cfg).unwrap();

    let mut c = claims_for("system:serviceaccount:agents:billing");
    c["kubernetes.io"] = json!({"namespace": "agents", "serviceaccount": {"name": "billing"}});
    let got = v.validate(&sign(&rsa1, &c), "billing").await.unwrap();
    assert_eq!(got.subject, "billing");
    assert_eq!(got.sub, "system:serviceaccount:agents:billing");
    assert_eq!(
        v.validate(&sign(&rsa1, &c), "reporting")
            .await
            .unwrap_err()
            .code(),
        "subject_mismatch"
    );
    c["kubernetes.io"]["serviceaccount"]["name"] = json!(42);
    assert_eq!(
        v.validate(&sign(&rsa1, &c), "billing")
            .await
            .unwrap_err()
            .code(),
        "invalid_claim"
    );
    c.as_object_mut().unwrap().remove("kubernetes.io");
    assert_eq!(
        v.validate(&sign(&rsa1, &c), "billing").await,
        Err(TokenError::MissingClaim(
            "/kubernetes.io/serviceaccount/name".into()
        ))
    );
}

#[test]
fn error_codes_are_distinct_snake_case_labels() {
    let all = [
        TokenError::Malformed(String::new()),
        TokenError::AlgorithmNone,
        TokenError::AlgorithmNotAllowed(String::new()),
        TokenError::AlgorithmKeyMismatch {
            alg: String::new(),
            key: String::new(),
        },
        TokenError::CriticalHeader(String::new()),
        TokenError::MissingKid,
        TokenError::UnknownKid(String::new()),
        TokenError::BadSignature,
        TokenError::Expired { exp: 0 },
        TokenError::NotYetValid { nbf: 0 },
        TokenError::WrongIssuer(String::new()),
        TokenError::WrongAudience(String::new()),
        TokenError::MissingClaim(String::new()),
        TokenError::InvalidClaim(String::new()),
        TokenError::SubjectMismatch {
            expected: String::new(),
            found: String::new(),
        },
        TokenError::JwksUnavailable(String::new()),
    ];
    let codes: HashSet<_> = all.iter().map(TokenError::code).collect();
    assert_eq!(codes.len(), all.len());
    for code in codes {
        assert!(
            code.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
            "{code}"
        );
    }
    // Token strings are clipped and quoted in messages.
    let long = "x".repeat(500);
    let msg = TokenError::UnknownKid(clip(&long)).to_string();
    assert!(msg.len() < 120, "{msg}");
    assert_eq!(clip("a\nb"), "\"a\\nb\"");
}

#[test]
fn verifier_and_token_file_are_shareable() {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<Verifier>();
    shareable::<TokenFile>();
    shareable::<TokenError>();
}

#[test]
fn bad_configurations_are_refused() {
    let base = file_config(Path::new("/nonexistent/jwks.json"));
    assert!(
        Verifier::new(base.clone()).is_ok(),
        "the file may appear later"
    );
    let mut cases = Vec::new();
    let mut c = base.clone();
    c.audiences.clear();
    cases.push(c);
    let mut c = base.clone();
    c.audiences = vec![String::new()];
    cases.push(c);
    let mut c = base.clone();
    c.issuer.clear();
    cases.push(c);
    let mut c = base.clone();
    c.jwks_max_stale = Duration::ZERO;
    cases.push(c);
    let mut c = base.clone();
    c.subject_claim.clear();
    cases.push(c);
    let mut c = base.clone();
    c.leeway = MAX_LEEWAY + Duration::from_secs(1);
    cases.push(c);
    for url in [
        "http://127.0.0.1:1/jwks",
        "ftp://127.0.0.1/jwks",
        "https://user:pw@127.0.0.1/jwks",
        "not a url",
        "/relative",
    ] {
        let mut c = base.clone();
        c.jwks = JwksSource::Url {
            url: url.into(),
            ca_file: None,
        };
        cases.push(c);
    }
    let mut c = base.clone();
    c.jwks = JwksSource::Url {
        url: "https://127.0.0.1/jwks".into(),
        ca_file: Some("/nonexistent/ca.pem".into()),
    };
    cases.push(c);
    for cfg in cases {
        let err = Verifier::new(cfg.clone()).unwrap_err();
        assert_eq!(err.code(), "oidc_config", "{cfg:?}: {err}");
    }
}

// ------------------------------------------------------------------ JWKS

#[test]
fn unusable_jwks_members_are_left_out() {
    let rsa1 = rsa(0);
    let ec = make_ec("ec-1", false);
    let ed = make_ed("ed-1");
    let mut enc = rsa(1).with_kid("enc");
    enc.jwk["use"] = json!("enc");
    let mut ops = rsa(1).with_kid("ops");
    ops.jwk["key_ops"] = json!(["encrypt"]);
    let mut rsa_es = rsa(1).with_kid("rsa-es");
    rsa_es.jwk["alg"] = json!("ES256");
    let mut short_ec = ec.with_kid("short");
    short_ec.jwk["x"] = json!(b64(&[1; 31]));
    let weak_rsa = json!({"kty": "RSA", "kid": "weak", "n": b64(&[0xff; 128]), "e": "AQAB"});
    let doc = json!({"keys": [
        {"kty": "oct", "kid": "hmac", "k": b64(b"secret")},
        enc.jwk, ops.jwk, rsa_es.jwk, short_ec.jwk, weak_rsa,
        {"kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA"},
        {"kty": "OKP", "crv": "X25519", "kid": "x25519", "x": b64(&[1; 32])},
        {"kty": "RSA", "kid": "nobits"},
        {"kty": "weird"},
        "not an object",
        rsa1.jwk, ec.jwk, ed.jwk,
    ]});
    let (set, skipped) = KeySet::parse(doc.to_string().as_bytes()).unwrap();
    assert_eq!(set.kids(), vec!["rsa-1", "ec-1", "ed-1"]);
    assert_eq!(skipped.reasons.len(), 11, "{:#?}", skipped.reasons);
    assert!(
        skipped.reasons[0].contains("HMAC"),
        "{}",
        skipped.reasons[0]
    );
    assert!(
        skipped.reasons[5].contains("1024 bits"),
        "{}",
        skipped.reasons[5]
    );

    // Nothing usable is an error, not an empty key set.
    let only_hmac = json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}).to_string();
    assert!(KeySet::parse(only_hmac.as_bytes()).is_err());
    assert!(KeySet::parse(br#"{"keys": []}"#).is_err());
    assert!(KeySet::parse(b"[]").is_err());
    assert!(KeySet::parse(b"{").is_err());

    // At most MAX_KEYS are kept.
    let many: Vec<Value> = (0..MAX_KEYS + 5)
        .map(|i| ec.with_kid(&format!("k{i}")).jwk)
        .collect();
    let (set, skipped) = KeySet::parse(json!({ "keys": many }).to_string().as_bytes()).unwrap();
    assert_eq!(set.len(), MAX_KEYS);
    assert_eq!(skipped.reasons.len(), 5);
}

#[tokio::test]
async fn hmac_keys_in_the_jwks_are_never_trusted() {
    let dir = TempDir::new("hmac");
    let rsa1 = rsa(0);
    let path = dir.path("jwks.json");
    let doc = json!({"keys": [
        {"kty": "oct", "kid": "shared", "k": b64(b"secret"), "alg": "HS256"},
        rsa1.jwk,
    ]});
    fs::write(&path, doc.to_string()).unwrap();
    let v = Verifier::new(file_config(&path)).unwrap();
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("shared".into());
    let token = encode(&h, &claims(), &EncodingKey::from_secret(b"secret")).unwrap();
    assert_eq!(
        v.validate(&token, SUBJECT).await,
        Err(TokenError::AlgorithmNotAllowed("HS256".into()))
    );
}

#[tokio::test]
async fn jwks_file_rotation_is_picked_up_without_restart() {
    let dir = TempDir::new("rotate");
    let (rsa1, rsa2) = (rsa(0), rsa(1));
    let path = dir.path("jwks.json");
    fs::write(&path, jwks(&[&rsa1])).unwrap();
    let v = Verifier::new(file_config(&path)).unwrap();

    // Nothing is loaded until a validation or refresh does it.
    assert_eq!(
        v.validate_cached(&sign(&rsa1, &claims()), SUBJECT)
            .unwrap_err()
            .code(),
        "jwks_unavailable"
    );
    v.validate(&sign(&rsa1, &claims()), SUBJECT).await.unwrap();
    let token2 = sign(&rsa2, &claims());
    assert_eq!(
        v.validate(&token2, SUBJECT).await.unwrap_err().code(),
        "unknown_kid"
    );

    // A new key appears: the unknown kid makes the verifier look at once.
    write_by_rename(&path, jwks(&[&rsa1, &rsa2]).as_bytes());
    assert_eq!(
        v.validate_cached(&token2, SUBJECT).unwrap_err().code(),
        "unknown_kid",
        "the data path does no I/O"
    );
    v.validate(&token2, SUBJECT).await.unwrap();
    v.validate_cached(&token2, SUBJECT).unwrap();
    assert_eq!(v.status().key_ids, vec!["rsa-1", "rsa-2"]);

    // A key removed from the file stops working once the file is looked at
    // again (at most every FILE_CHECK_INTERVAL).
    write_by_rename(&path, jwks(&[&rsa2]).as_bytes());
    tokio::time::sleep(FILE_CHECK_INTERVAL + Duration::from_millis(100)).await;
    assert_eq!(
        v.validate(&sign(&rsa1, &claims()), SUBJECT)
            .await
            .unwrap_err()
            .code(),
        "unknown_kid"
    );
    v.validate(&token2, SUBJECT).await.unwrap();

    // A broken or missing file keeps the last good keys.
    write_by_rename(&path, b"{ not json");
    let err = v.refresh().await.unwrap_err();
    assert_eq!(err.code(), "jwks_invalid", "{err}");
    v.validate(&token2, SUBJECT).await.unwrap();
    fs::remove_file(&path).unwrap();
    assert_eq!(v.refresh().await.unwrap_err().code(), "jwks_file");
    v.validate(&token2, SUBJECT).await.unwrap();
    let status = v.status();
    assert!(status.usable && status.last_error.is_some(), "{status:?}");
}

#[tokio::test]
async fn jwks_file_keys_go_stale_when_the_file_stays_unreadable() {
    let dir = TempDir::new("stale-file");
    let rsa1 = rsa(0);
    let path = dir.path("jwks.json");
    fs::write(&path, jwks(&[&rsa1])).unwrap();
    let mut cfg = file_config(&path);
    cfg.jwks_max_stale = Duration::from_millis(300);
    let v = Verifier::new(cfg).unwrap();
    let token = sign(&rsa1, &claims());
    v.validate(&token, SUBJECT).await.unwrap();
    // An unchanged file confirms the keys: they stay fresh.
    tokio::time::sleep(Duration::from_millis(200)).await;
    v.refresh().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    v.validate_cached(&token, SUBJECT).unwrap();
    fs::remove_file(&path).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(v.refresh().await.is_err());
    let err = v.validate(&token, SUBJECT).await.unwrap_err();
    assert_eq!(err.code(), "jwks_unavailable", "{err}");
    assert!(!v.status().usable);
}

// ----------------------------------------------------------------- HTTPS

/// What the local JWKS server answers.
#[derive(Clone)]
enum Answer {
    Jwks(String),
    Status(u16),
    Huge,
    Hang,
}

struct Pki {
    ca_pem: String,
    leaf_der: rustls_pki_types::CertificateDer<'static>,
    leaf_key: Vec<u8>,
}

fn make_pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        SanType,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name
        .push(DnType::CommonName, "portcullis test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        leaf_der: leaf_cert.der().clone(),
        leaf_key: leaf_key.serialize_der(),
    }
}

/// An HTTPS JWKS server on 127.0.0.1 that counts requests.
struct JwksServer {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    answer: Arc<Mutex<Answer>>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(pki: &Pki, answer: Answer) -> Self {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(pki.leaf_key.clone().into());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![pki.leaf_der.clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let answer = Arc::new(Mutex::new(answer));
        let task = {
            let (hits, answer) = (Arc::clone(&hits), Arc::clone(&answer));
            tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    let (acceptor, hits, answer) =
                        (acceptor.clone(), Arc::clone(&hits), Arc::clone(&answer));
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let service = hyper::service::service_fn(move |_req| {
                            let (hits, answer) = (Arc::clone(&hits), Arc::clone(&answer));
                            async move {
                                hits.fetch_add(1, Ordering::SeqCst);
                                let answer = answer.lock().unwrap().clone();
                                let (status, body) = match answer {
                                    Answer::Jwks(body) => (200, body.into_bytes()),
                                    Answer::Status(code) => (code, b"nope".to_vec()),
                                    Answer::Huge => (200, vec![b' '; MAX_JWKS_BYTES + 1]),
                                    Answer::Hang => {
                                        tokio::time::sleep(Duration::from_secs(3600)).await;
                                        (200, Vec::new())
                                    }
                                };
                                Ok::<_, Infallible>(
                                    Response::builder()
                                        .status(status)
                                        .header("content-type", "application/json")
                                        .body(Full::new(Bytes::from(body)))
                                        .unwrap(),
                                )
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), service)
                            .await;
                    });
                }
            })
        };
        Self {
            addr,
            hits,
            answer,
            task,
        }
    }

    fn url(&self) -> String {
        format!("https://{}/.well-known/jwks.json", self.addr)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn set(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    /// Stops listening: new connections are refused.
    async fn stop(&self) {
        self.task.abort();
        // Wait until the listener is really closed.
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(self.addr).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("server did not stop");
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn url_config(server: &JwksServer, ca: &Path) -> IssuerConfig {
    IssuerConfig::new(
        "corp",
        ISS,
        vec![AUD.to_string()],
        JwksSource::Url {
            url: server.url(),
            ca_file: Some(ca.to_path_buf()),
        },
    )
}

#[tokio::test]
async fn jwks_over_https_refreshes_once_per_interval_on_unknown_kid() {
    let dir = TempDir::new("https");
    let pki = make_pki();
    let ca = dir.path("ca.pem");
    fs::write(&ca, &pki.ca_pem).unwrap();
    let (rsa1, rsa2) = (rsa(0), rsa(1));
    let server = JwksServer::start(&pki, Answer::Jwks(jwks(&[&rsa1]))).await;
    let v = Verifier::new(url_config(&server, &ca)).unwrap();
    let token1 = sign(&rsa1, &claims());

    // The first validation fetches; later ones use the cache.
    v.validate(&token1, SUBJECT).await.unwrap();
    assert_eq!(server.hits(), 1);
    v.validate(&token1, SUBJECT).await.unwrap();
    v.validate_cached(&token1, SUBJECT).unwrap();
    assert_eq!(server.hits(), 1);

    // The issuer rotates in a new key: the first token with the new kid
    // causes one refresh.
    server.set(Answer::Jwks(jwks(&[&rsa1, &rsa2])));
    v.validate(&sign(&rsa2, &claims()), SUBJECT).await.unwrap();
    assert_eq!(server.hits(), 2);

    // Tokens with kids nobody published: no more fetches within
    // refresh_min_interval, however many there are.
    for i in 0..20 {
        let bogus = make_ec(&format!("bogus-{i}"), false);
        assert_eq!(
            v.validate(&sign(&bogus, &claims()), SUBJECT)
                .await
                .unwrap_err()
                .code(),
            "unknown_kid"
        );
    }
    assert_eq!(server.hits(), 2, "unknown kids are rate-limited");

    // The explicit (periodic) refresh is not rate-limited.
    v.refresh().await.unwrap();
    assert_eq!(server.hits(), 3);
    assert_eq!(v.status().loads, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_validations_share_one_fetch() {
    let dir = TempDir::new("https-concurrent");
    let pki = make_pki();
    let ca = dir.path("ca.pem");
    fs::write(&ca, &pki.ca_pem).unwrap();
    let rsa1 = rsa(0);
    let server = JwksServer::start(&pki, Answer::Jwks(jwks(&[&rsa1]))).await;
    let v = Arc::new(Verifier::new(url_config(&server, &ca)).unwrap());
    let token = Arc::new(sign(&rsa1, &claims()));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (v, token) = (Arc::clone(&v), Arc::clone(&token));
            tokio::spawn(async move { v.validate(&token, SUBJECT).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn unknown_kid_refresh_allowed_again_after_the_interval() {
    let dir = TempDir::new("https-interval");
    let pki = make_pki();
    let ca = dir.path("ca.pem");
    fs::write(&ca, &pki.ca_pem).unwrap();
    let (rsa1, rsa2) = (rsa(0), rsa(1));
    let server = JwksServer::start(&pki, Answer::Jwks(jwks(&[&rsa1]))).await;
    let mut cfg = url_config(&server, &ca);
    cfg.refresh_min_interval = Duration::from_millis(300);
    let v = Verifier::new(cfg).unwrap();
    v.refresh().await.unwrap();
    let token2 = sign(&rsa2, &claims());
    assert_eq!(
        v.validate(&token2, SUBJECT).await.unwrap_err().code(),
        "unknown_kid"
    );
    assert_eq!(server.hits(), 2);
    server.set(Answer::Jwks(jwks(&[&rsa1, &rsa2])));
    assert_eq!(
        v.validate(&token2, SUBJECT).await.unwrap_err().code(),
        "unknown_kid"
    );
    assert_eq!(server.hits(), 2, "within the interval");
    tokio::time::sleep(Duration::from_millis(350)).await;
    v.validate(&token2, SUBJECT).await.unwrap();
    assert_eq!(server.hits(), 3);
}

#[tokio::test]
async fn cached_keys_outlive_the_issuer_until_max_stale() {
    let dir = TempDir::new("https-down");
    let pki = make_pki();
    let ca = dir.path("ca.pem");
    fs::write(&ca, &pki.ca_pem).unwrap();
    let rsa1 = rsa(0);
    let server = JwksServer::start(&pki, Answer::Jwks(jwks(&[&rsa1]))).await;
    let durable = Verifier::new(url_config(&server, &ca)).unwrap();
    let mut cfg = url_config(&server, &ca);
    cfg.jwks_max_stale = Duration::from_millis(800);
    cfg.refresh_min_interval = Duration::ZERO;
    let short = Verifier::new(cfg).unwrap();
    let token = sign(&rsa1, &claims());
    durable.validate(&token, SUBJECT).await.unwrap();
    short.validate(&token, SUBJECT).await.unwrap();
    assert_eq!(server.hits(), 2);

    server.stop().await;
    // The issuer is unreachable: a refresh fails, the cached keys still work.
    let err = durable.refresh().await.unwrap_err();
    assert_eq!(err.code(), "jwks_fetch", "{err}");
    durable.validate(&token, SUBJECT).await.unwrap();
    durable.validate_cached(&token, SUBJECT).unwrap();
    short.validate(&token, SUBJECT).await.unwrap();

    // Past jwks_max_stale (and a failed re-fetch), tokens are refused.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let err = short.validate(&token, SUBJECT).await.unwrap_err();
    assert_eq!(err.code(), "jwks_unavailable", "{err}");
    assert!(err.to_string().contains("connect"), "{err}");
    assert_eq!(
        short.validate_cached(&token, SUBJECT).unwrap_err().code(),
        "jwks_unavailable"
    );
    durable.validate(&token, SUBJECT).await.unwrap();
}

#[tokio::test]
async fn jwks_fetch_failures_are_errors_and_keep_nothing_bad() {
    let dir = TempDir::new("https-bad");
    let pki = make_pki();
    let ca = dir.path("ca.pem");
    fs::write(&ca, &pki.ca_pem).unwrap();
    let other_ca = dir.path("other-ca.pem");
    fs::write(&other_ca, make_pki().ca_pem).unwrap();
    let rsa1 = rsa(0);
    let server = JwksServer::start(&pki, Answer::Jwks(jwks(&[&rsa1]))).await;

    // A server whose certificate is not from the configured CA.
    let untrusted = Verifier::new(url_config(&server, &other_ca)).unwrap();
    let err = untrusted.refresh().await.unwrap_err();
    assert!(err.to_string().contains("TLS"), "{err}");
    // Nor from the system's roots.
    if Path::new("/etc/ssl/certs/ca-certificates.crt").exists() {
        let mut cfg = url_config(&server, &ca);
        cfg.jwks = JwksSource::Url {
            url: server.url(),
            ca_file: None,
        };
        let system = Verifier::new(cfg).unwrap();
        let err = system.refresh().await.unwrap_err();
        assert!(err.to_string().contains("TLS"), "{err}");
    }
    // A token cannot be validated by a verifier that never loaded keys.
    assert_eq!(
        untrusted
            .validate(&sign(&rsa1, &claims()), SUBJECT)
            .await
            .unwrap_err()
            .code(),
        "jwks_unavailable"
    );

    let v = Verifier::new(url_config(&server, &ca)).unwrap();
    v.refresh().await.unwrap();
    let token = sign(&rsa1, &claims());
    for (answer, code, needle) in [
        (Answer::Status(404), "jwks_fetch", "404"),
        (Answer::Status(302), "jwks_fetch", "302"),
        (Answer::Huge, "jwks_fetch", "larger than"),
        (Answer::Jwks("<html>".into()), "jwks_invalid", "not JSON"),
        (
            Answer::Jwks(r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#.into()),
            "jwks_invalid",
            "no usable",
        ),
    ] {
        server.set(answer);
        let err = v.refresh().await.unwrap_err();
        assert_eq!(err.code(), code, "{err}");
        assert!(err.to_string().contains(needle), "{err}");
        // The last good keys are still in use.
        v.validate(&token, SUBJECT).await.unwrap();
    }

    // A server that never answers is given up on after fetch_timeout.
    server.set(Answer::Hang);
    let mut cfg = url_config(&server, &ca);
    cfg.fetch_timeout = Duration::from_millis(300);
    let slow = Verifier::new(cfg).unwrap();
    let started = Instant::now();
    let err = slow.refresh().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3), "{err}");
    assert!(err.to_string().contains("within"), "{err}");
}

// ------------------------------------------------------------ token files

#[test]
fn token_file_rotation_by_rename_is_picked_up() {
    let dir = TempDir::new("token");
    let path = dir.path("token");
    fs::write(&path, "  first.token.value\n").unwrap();
    let file = TokenFile::new(&path);
    assert_eq!(file.generation(), 0);
    assert_eq!(file.current().unwrap(), "first.token.value");
    let seen = file.generation();
    assert_eq!(seen, 1);
    assert_eq!(file.current().unwrap(), "first.token.value");
    assert!(!file.changed_since(seen));

    write_by_rename(&path, b"second.token.value\n");
    assert_eq!(file.current().unwrap(), "second.token.value");
    assert!(file.changed_since(seen));
    assert_eq!(file.generation(), 2);

    // Rewriting the same token is not a rotation.
    write_by_rename(&path, b"second.token.value");
    assert_eq!(file.current().unwrap(), "second.token.value");
    assert_eq!(file.generation(), 2);

    // An in-place rewrite (same inode) of the same size is noticed too.
    fs::write(&path, "third!.token.value").unwrap();
    assert_eq!(file.current().unwrap(), "third!.token.value");
    assert_eq!(file.generation(), 3);
}

#[test]
fn token_file_symlink_swap_is_picked_up() {
    // The layout of a Kubernetes projected volume:
    // token -> ..data/token, ..data -> ..v1 (swapped atomically to ..v2).
    let dir = TempDir::new("token-k8s");
    fs::create_dir(dir.path("..v1")).unwrap();
    fs::create_dir(dir.path("..v2")).unwrap();
    fs::write(dir.path("..v1/token"), "v1.token.x").unwrap();
    fs::write(dir.path("..v2/token"), "v2.token.x").unwrap();
    std::os::unix::fs::symlink("..v1", dir.path("..data")).unwrap();
    std::os::unix::fs::symlink("..data/token", dir.path("token")).unwrap();
    let file = TokenFile::new(dir.path("token"));
    assert_eq!(file.current().unwrap(), "v1.token.x");

    std::os::unix::fs::symlink("..v2", dir.path("..data_tmp")).unwrap();
    fs::rename(dir.path("..data_tmp"), dir.path("..data")).unwrap();
    assert_eq!(file.current().unwrap(), "v2.token.x");
    assert_eq!(file.generation(), 2);
}

#[test]
fn token_file_problems_are_errors() {
    let dir = TempDir::new("token-bad");
    let path = dir.path("token");
    let file = TokenFile::with_max_len(&path, 16);
    assert_eq!(file.current().unwrap_err().code(), "token_file_missing");
    fs::write(&path, " \n\t").unwrap();
    assert_eq!(file.current().unwrap_err().code(), "token_file_empty");
    fs::write(&path, [0xff, 0xfe, b'a']).unwrap();
    assert_eq!(file.current().unwrap_err().code(), "token_file_not_text");
    fs::write(&path, "x".repeat(17)).unwrap();
    assert_eq!(file.current().unwrap_err().code(), "token_file_too_large");
    fs::write(&path, "x".repeat(16)).unwrap();
    assert_eq!(file.current().unwrap(), "x".repeat(16));
    // A token that disappears is not served from the cache.
    fs::remove_file(&path).unwrap();
    assert!(file.current().is_err());
    assert_eq!(
        TokenFile::new(dir.path("..")).current().unwrap_err().code(),
        "token_file_unreadable"
    );
}

#[tokio::test]
async fn rotated_token_file_validates_end_to_end() {
    let dir = TempDir::new("token-e2e");
    let rsa1 = rsa(0);
    let (v, _) = file_verifier(&dir, &[&rsa1]).await;
    let path = dir.path("token");
    let mut c = claims();
    c["exp"] = json!(now() - 3600);
    fs::write(&path, sign(&rsa1, &c)).unwrap();
    let file = TokenFile::new(&path);
    assert_eq!(
        v.validate(&file.current().unwrap(), SUBJECT)
            .await
            .unwrap_err()
            .code(),
        "expired"
    );
    write_by_rename(&path, sign(&rsa1, &claims()).as_bytes());
    v.validate(&file.current().unwrap(), SUBJECT).await.unwrap();
}
