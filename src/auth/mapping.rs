//! `JWT_ROLE_CLAIM` and `JWT_TENANT_CLAIM`: where an external token keeps
//! what we call `role` and `tenant`, read into those two claims before the
//! token's claims become [`Claims`](super::Claims). Our own HS256 tokens are
//! never mapped.
//!
//! The role is `admin` when the value found is the string `admin`, or a list
//! holding it (Keycloak's `realm_access.roles`); anything else, nothing
//! included, is `user`: a provider's roles are many, ours two, and an unknown
//! one is given the least. The tenant must be a string that passes the usual
//! tenant check; a token without it is refused (it would otherwise land in
//! tenant `default`, with other people's data).

use serde_json::{Map, Value};

use super::{AuthError, Role};
use crate::config::ClaimPath;

/// The two optional paths, applied to every external token.
#[derive(Debug, Clone, Default)]
pub struct ClaimMapping {
    pub role: Option<ClaimPath>,
    pub tenant: Option<ClaimPath>,
}

impl ClaimMapping {
    /// Sets `role` and `tenant` of `claims` from where the paths point.
    pub fn apply(&self, claims: &mut Map<String, Value>) -> Result<(), AuthError> {
        if self.role.is_none() && self.tenant.is_none() {
            return Ok(());
        }
        let tenant = match &self.tenant {
            None => None,
            Some(path) => match lookup(claims, path) {
                Some(Value::String(tenant)) => Some(tenant.clone()),
                Some(_) => return Err(AuthError::BadClaims("the tenant claim is not a string")),
                None => return Err(AuthError::BadClaims("the tenant claim is missing")),
            },
        };
        let role = self.role.as_ref().map(|path| role_of(lookup(claims, path)));
        if let Some(role) = role {
            let name = match role {
                Role::Admin => "admin",
                Role::User => "user",
            };
            claims.insert("role".to_owned(), Value::from(name));
        }
        if let Some(tenant) = tenant {
            claims.insert("tenant".to_owned(), Value::from(tenant));
        }
        Ok(())
    }
}

/// The value `path` points at, walking objects by name and arrays by index.
fn lookup<'a>(claims: &'a Map<String, Value>, path: &ClaimPath) -> Option<&'a Value> {
    let (first, rest) = path.segments().split_first()?;
    let mut value = claims.get(first)?;
    for segment in rest {
        value = match value {
            Value::Object(map) => map.get(segment)?,
            Value::Array(items) => items.get(segment.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(value)
}

/// `admin` for the string `admin` or a list holding it; `user` otherwise.
fn role_of(value: Option<&Value>) -> Role {
    let admin = Value::from("admin");
    match value {
        Some(Value::String(role)) if role == "admin" => Role::Admin,
        Some(Value::Array(roles)) if roles.contains(&admin) => Role::Admin,
        _ => Role::User,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn path(raw: &str) -> Option<ClaimPath> {
        Some(ClaimPath::parse("JWT_ROLE_CLAIM", raw).expect("a valid path"))
    }

    fn mapped(role: &str, tenant: &str, claims: Value) -> Result<(Value, Value), AuthError> {
        let mapping = ClaimMapping {
            role: path(role),
            tenant: path(tenant),
        };
        let Value::Object(mut claims) = claims else {
            panic!("claims are an object")
        };
        mapping.apply(&mut claims)?;
        Ok((claims["role"].clone(), claims["tenant"].clone()))
    }

    #[test]
    fn auth0_namespaced_claims_map_by_pointer() {
        let claims = json!({
            "sub": "auth0|1",
            "role": "superuser",
            "https://example.com/tenant": "acme",
            "app_metadata": {"role": "admin"},
        });
        assert_eq!(
            mapped(
                "/app_metadata/role",
                "/https:~1~1example.com~1tenant",
                claims
            ),
            Ok((json!("admin"), json!("acme")))
        );
    }

    #[test]
    fn keycloak_role_lists_and_plain_names_map() {
        let claims = |roles: Value| json!({"org_id": "org-7", "realm_access": {"roles": roles}, "tenant": "other"});
        for (roles, role) in [
            (json!(["offline_access", "admin"]), "admin"),
            (json!(["offline_access"]), "user"),
            (json!([]), "user"),
            (json!("admin"), "admin"),
            (json!("Admin"), "user"),
            (json!("editor"), "user"),
            (json!({"admin": true}), "user"),
            (json!(1), "user"),
        ] {
            assert_eq!(
                mapped("/realm_access/roles", "org_id", claims(roles.clone())),
                Ok((json!(role), json!("org-7"))),
                "{roles}"
            );
        }
        let none = json!({"org_id": "org-7"});
        assert_eq!(
            mapped("/realm_access/roles", "org_id", none),
            Ok((json!("user"), json!("org-7")))
        );
    }

    #[test]
    fn pointers_walk_arrays_and_unescape() {
        let claims = json!({"a/b": {"c~d": ["x", {"t": "t1"}]}, "roles": ["admin"]});
        assert_eq!(
            mapped("/roles/0", "/a~1b/c~0d/1/t", claims),
            Ok((json!("admin"), json!("t1")))
        );
    }

    #[test]
    fn a_missing_or_non_string_tenant_is_refused() {
        let missing = mapped("role", "/org/id", json!({"org": {}}));
        assert_eq!(
            missing,
            Err(AuthError::BadClaims("the tenant claim is missing"))
        );
        let number = mapped("role", "org_id", json!({"org_id": 42}));
        assert_eq!(
            number,
            Err(AuthError::BadClaims("the tenant claim is not a string"))
        );
    }

    #[test]
    fn without_paths_nothing_changes() {
        let mut claims = Map::new();
        claims.insert("role".into(), json!("superuser"));
        ClaimMapping::default().apply(&mut claims).unwrap();
        assert_eq!(claims["role"], json!("superuser"));
    }
}
