//! sea-orm entities for the `product`, `orders` and `rejection` tables.

pub mod product {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "product")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub product_id: i64,
        pub name: String,
        pub stock: i32,
        pub sold: i32,
        pub price_cents: i64,
        pub starts_at: ChronoDateTimeUtc,
        pub ends_at: ChronoDateTimeUtc,
        pub created_at: ChronoDateTimeUtc,
        /// ISO 4217 code of the price's currency; `price_cents` is in its minor unit.
        pub currency: String,
        /// Set when the product is first loaded into Redis (and at every preheat since).
        pub preheated_at: Option<ChronoDateTimeUtc>,
        /// Set when the ended, drained sale was retired from Redis (its keys expire); cleared
        /// by a new preheat.
        pub retired_at: Option<ChronoDateTimeUtc>,
        /// Shoppers join a waiting room and buy once admitted (`src/room.rs`).
        pub waiting_room: bool,
        /// Joining the waiting room takes a proof of work (`src/pow.rs`).
        pub proof_of_work: bool,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod orders {
    use sea_orm::entity::prelude::*;
    use serde::{Deserialize, Serialize};

    /// An order's status in Postgres (`orders_status_check`). Names are snake_case both in
    /// SQL and JSON.
    #[derive(
        Clone,
        Copy,
        Debug,
        PartialEq,
        Eq,
        EnumIter,
        DeriveActiveEnum,
        Serialize,
        Deserialize,
        utoipa::ToSchema,
    )]
    #[sea_orm(rs_type = "String", db_type = "Text", rename_all = "snake_case")]
    #[serde(rename_all = "snake_case")]
    pub enum OrderStatus {
        /// Awaiting payment until `expires_at`.
        PendingPayment,
        Paid,
        Cancelled,
        Expired,
    }

    impl std::fmt::Display for OrderStatus {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.to_value())
        }
    }

    /// The statuses as queries write them: SQL literals, not bound parameters, so that Postgres
    /// matches them to the partial indexes on `status` (`orders_expiry_idx`,
    /// `orders_unreleased_idx`) in whatever plan it keeps. A test holds each to [`OrderStatus`].
    pub mod status_sql {
        pub const PENDING_PAYMENT: &str = "'pending_payment'";
        pub const PAID: &str = "'paid'";
        pub const CANCELLED: &str = "'cancelled'";
        pub const EXPIRED: &str = "'expired'";
        /// The statuses of an order that holds its unit: awaiting payment, or paid.
        pub const LIVE: &str = "('pending_payment', 'paid')";
        /// The statuses of an order closed unpaid, whose unit goes back on sale.
        pub const CLOSED: &str = "('cancelled', 'expired')";
    }

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "orders")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub order_id: Uuid,
        pub reservation_id: Uuid,
        pub user_id: i64,
        pub product_id: i64,
        pub status: OrderStatus,
        pub reserved_at: ChronoDateTimeUtc,
        pub created_at: ChronoDateTimeUtc,
        pub expires_at: ChronoDateTimeUtc,
        pub paid_at: Option<ChronoDateTimeUtc>,
        pub closed_at: Option<ChronoDateTimeUtc>,
        pub released_at: Option<ChronoDateTimeUtc>,
        /// The payment provider's reference, once the storefront's backend recorded a payment.
        pub payment_reference: Option<String>,
        pub paid_amount_cents: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}

    #[cfg(test)]
    mod tests {
        use sea_orm::Iterable;

        use super::{OrderStatus, status_sql::*};

        /// Each status's literal (a new status fails to compile here until it has one).
        fn literal(status: OrderStatus) -> &'static str {
            match status {
                OrderStatus::PendingPayment => PENDING_PAYMENT,
                OrderStatus::Paid => PAID,
                OrderStatus::Cancelled => CANCELLED,
                OrderStatus::Expired => EXPIRED,
            }
        }

        #[test]
        fn the_sql_literals_are_the_statuses_own_names() {
            for status in OrderStatus::iter() {
                assert_eq!(literal(status), format!("'{status}'"));
            }
            let list = |statuses: &[OrderStatus]| {
                let literals: Vec<&str> = statuses.iter().map(|s| literal(*s)).collect();
                format!("({})", literals.join(", "))
            };
            assert_eq!(
                LIVE,
                list(&[OrderStatus::PendingPayment, OrderStatus::Paid])
            );
            assert_eq!(
                CLOSED,
                list(&[OrderStatus::Cancelled, OrderStatus::Expired])
            );
        }
    }
}

pub mod rejection {
    use sea_orm::entity::prelude::*;

    /// A win that could not become an order (terminal; see `migrations/0003_rejection.sql`).
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "rejection")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub reservation_id: Uuid,
        pub user_id: i64,
        pub product_id: i64,
        /// Why, in plain words, for the shopper.
        pub reason: String,
        pub created_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
